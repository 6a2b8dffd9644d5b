"""A site's policy against the server's round request, on messages built as the server sends them
(the deployment test runs every refusal through real SuperNodes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from federated.policy import LocalFingerprints, RoundRequest, announcement, policy_problems
from federated.spec import DPSpec, SitePolicy, load_site
from federated.strategy import CLIPPING_NORM_KEY, SECAGG_RECORD, epsilon_after
from launcher.errors import SpecError

pytestmark = pytest.mark.usefixtures("task_identity")
MODEL, CODE = "a" * 64, "c" * 64
LOCAL = LocalFingerprints(MODEL, CODE)


def request(
    sites: int = 3, dp: DPSpec | None = None, noise: float | None = None, secagg: bool = False, **config: Any
) -> RoundRequest:
    """The request a site parses from a train message carrying the server's announcement."""
    records = {"config": ConfigRecord({**announcement(sites, MODEL, CODE, dp, noise, 5), **config})}
    if secagg:
        records = {SECAGG_RECORD: ConfigRecord({"stage": "collect"}), "fitins.config": records["config"]}
    message = Message(RecordDict(records), dst_node_id=1, message_type=MessageType.TRAIN)
    parsed = RoundRequest.from_message(message)
    assert parsed is not None
    return parsed


def refusals(policy: dict[str, Any], req: RoundRequest, local: LocalFingerprints = LOCAL) -> str:
    return "; ".join(policy_problems(SitePolicy.model_validate(policy), req, local))


def test_no_policy_trains_every_round() -> None:
    assert refusals({}, request(sites=1)) == ""


def test_secagg_required() -> None:
    assert "requires SecAgg+" in refusals({"require_secagg": True}, request())
    assert refusals({"require_secagg": True}, request(secagg=True)) == ""


def test_client_clipping_required_and_not_looser_than_the_policy() -> None:
    policy = {"max_clipping_norm": 1.0}
    assert "asks for no client-side clipping" in refusals(policy, request())
    assert "clipping norm 2 is looser than the policy's max_clipping_norm 1" in refusals(
        policy, request(**{CLIPPING_NORM_KEY: 2.0})
    )
    assert refusals(policy, request(**{CLIPPING_NORM_KEY: 0.5})) == ""


def test_epsilon_is_recomputed_by_the_site_from_the_announced_noise() -> None:
    dp = DPSpec(delta=1e-5)
    req = request(dp=dp, noise=2.0)
    epsilon = epsilon_after(2.0, dp, 3, 5)  # Flower's RDP accountant, 5 rounds
    assert req.epsilon() == pytest.approx(epsilon)
    assert refusals({"max_epsilon": epsilon * 1.01}, req) == ""
    assert f"is {epsilon:.3g}" in refusals({"max_epsilon": epsilon * 0.99}, req)
    assert "announces no accounted DP" in refusals({"max_epsilon": 8.0}, request())


def test_too_few_sites() -> None:
    assert "2 site(s), fewer than the policy's min_sites 3" in refusals({"min_sites": 3}, request(sites=2))
    assert refusals({"min_sites": 3}, request(sites=3)) == ""


def test_fingerprints_bind_the_local_model_and_code_and_the_servers_announcement() -> None:
    pinned = {"fingerprints": {"base_model": MODEL, "code": CODE}}
    assert refusals(pinned, request()) == ""
    other = LocalFingerprints("b" * 64, CODE)
    assert (
        refusals(pinned, request(), other)
        == "this site's base model has sha256 bbbbbbbbbbbb..., the policy pins aaaaaaaaaaaa..."
    )
    announced_other = request(**{"code-sha256": "d" * 64})
    assert refusals(pinned, announced_other) == (
        "the server announces sha256 dddddddddddd... for its code, the policy pins cccccccccccc..."
    )


def test_a_policy_no_federation_can_meet_is_a_spec_error(tmp_path: Path) -> None:
    spec = tmp_path / "site.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "site": "a",
                "job": "job.yaml",
                "insecure": True,
                "policy": {"require_secagg": True, "max_epsilon": 8},
            }
        )
    )
    with pytest.raises(SpecError, match="require_secagg cannot be met together with max_epsilon"):
        load_site(spec)
    spec.write_text(
        yaml.safe_dump({"site": "a", "job": "j.yaml", "insecure": True, "policy": {"min_site": 2}})
    )
    with pytest.raises(SpecError, match="min_site"):
        load_site(spec)
