"""The router actor's side of change, without Ray: a rollout's decision moves the loser's
queued requests to the winner and tells the loser's replicas they are retired; a new router
takes the decision from the replicas instead of judging again; a router that Serve replaces
hands its queued requests back for its successor."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from pagedserve.cluster import router as router_module
from pagedserve.cluster.router import RouterDeployment
from pagedserve.cluster.router_calls import ROUTER_REPLACED

ROLLOUT = {"canary_share": 0.5, "max_error_rate": 0.03, "window_s": 60.0, "min_requests": 3}


def report(rid: str, version: str, running: int = 0) -> dict:
    return {"replica_id": rid, "max_num_seqs": 2, "num_running": running, "num_waiting": 0,
            "num_free_blocks": 100, "num_total_blocks": 100, "block_size": 16,
            "version": version}


def request(rid: str) -> dict:
    return {"request_id": rid, "num_prompt_tokens": 20}


def test_a_rolled_back_version_hands_its_queued_requests_to_the_old_one_and_retires():
    async def scenario():
        router = RouterDeployment({"max_waiting_per_replica": 0}, rollout=ROLLOUT)
        await router.report(report("old", "stable", running=2))  # both full: requests queue
        await router.report(report("new", "canary", running=2))
        waiting = [asyncio.create_task(router.admit_versioned(request(f"r{i}")))
                   for i in range(4)]
        await asyncio.sleep(0)
        assert router.stats()["queue_len"] == 4
        for _ in range(ROLLOUT["min_requests"]):  # the new version fails its requests
            router.record_outcome("canary", ok=False)
        assert router.stats()["rollout"]["state"] == "rolled_back"
        assert (await router.report(report("new", "canary", running=0)))["retired"] is True
        assert router.stats()["queue_len"] == 4  # the retired one gets none of them
        view = await router.report(report("old", "stable", running=0))
        assert view["retired"] is False
        admitted = await asyncio.gather(*waiting[:2])
        assert admitted == [("old", "stable")] * 2
        for task in waiting[2:]:
            task.cancel()

    asyncio.run(scenario())


def test_a_router_being_replaced_hands_back_what_it_queued(monkeypatch):
    me = SimpleNamespace(replica_id=SimpleNamespace(unique_id="router-1"))
    monkeypatch.setattr(router_module.serve, "get_replica_context", lambda: me)

    async def scenario():
        router = RouterDeployment()
        await router.report(report("A", "stable", running=2))  # full
        queued = asyncio.create_task(router.admit(request("r1")))
        await asyncio.sleep(0)
        router._on_router_states({"router-2": "RUNNING"}, 1)  # another one: nothing happens
        assert not queued.done()
        router._on_router_states({"router-1": "STOPPING", "router-2": "RUNNING"}, 1)
        assert await queued == ROUTER_REPLACED  # the ingress submits it to the next router
        assert await router.admit(request("r2")) == ROUTER_REPLACED  # and no new ones
        assert await router.admit_versioned(request("r3")) == ROUTER_REPLACED
        assert router.stats()["queue_len"] == 0

    asyncio.run(scenario())


def test_a_new_router_adopts_the_decision_the_replicas_kept_for_the_same_versions():
    async def scenario():
        first = RouterDeployment(rollout={**ROLLOUT, "key": "pair-1"})
        await first.report(report("old", "stable"))
        await first.report(report("new", "canary"))
        await first.admit_versioned(request("r0"))  # the canary phase starts
        for _ in range(ROLLOUT["min_requests"]):
            first.record_outcome("canary", ok=False)
        kept = (await first.report(report("old", "stable")))["rollout"]
        assert kept == {"state": "rolled_back", "key": "pair-1"}
        # The router restarts: the old version's replica tells the new one at its next report.
        second = RouterDeployment(rollout={**ROLLOUT, "key": "pair-1"})
        queued = asyncio.create_task(second.admit_versioned(request("r1")))
        await asyncio.sleep(0)  # taken before any replica reported: for the old version
        view = await second.report({**report("old", "stable"), "rollout": kept})
        assert second.stats()["rollout"]["state"] == "rolled_back"
        assert second.stats()["rollout"]["reason"] == "adopted" and view["rollout"] == kept
        assert (await second.report(report("new", "canary")))["retired"] is True
        assert await queued == ("old", "stable")
        # A redeploy with another new version judges it afresh.
        third = RouterDeployment(rollout={**ROLLOUT, "key": "pair-2"})
        await third.report({**report("old", "stable"), "rollout": kept})
        assert third.stats()["rollout"]["state"] == "canary"

    asyncio.run(scenario())
