"""The ``flotilla fed`` commands and what runs them on this machine: simulation, deployment of
SuperLink and SuperNodes, trial keys, reports. The Flower apps never import this package.
"""
