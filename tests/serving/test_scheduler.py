"""Scheduler policies: admission orders, the VTC lift, weights, length prediction, RPM refusals, and
VTC against an independent re-statement of the authors' artifact (vtc_req_queue.py / lcf_req_queue.py)."""

import collections
import random

import pytest

from serving.request import Request
from serving.scheduler import RateLimited, make_scheduler
from serving.schedulers import ProfileCost


def req(rid, client, n_in=4):
    return Request(rid, list(range(1, n_in + 1)), client=client)


def admit_all(s, now=0.0):
    return [r.request_id for r in s.admit(lambda r: True, now)]


def at_most(n):
    """A `fits` that admits the first n requests offered."""
    left = [n]

    def fits(r):
        left[0] -= 1
        return left[0] >= 0

    return fits


def admit_n(s, n, now=0.0):
    return [r.request_id for r in s.admit(at_most(n), now)]


def test_fcfs_admits_in_arrival_order_and_stops_at_the_first_misfit():
    s = make_scheduler("fcfs")
    for i, (client, n) in enumerate([("a", 5), ("b", 3), ("a", 9), ("b", 2)]):
        s.add(req(f"r{i}", client, n), float(i))
    offered = []

    def fits(r):
        offered.append(r.request_id)
        return len(r.prompt_ids) < 8

    assert [r.request_id for r in s.admit(fits, 5.0)] == ["r0", "r1"]
    assert offered == ["r0", "r1", "r2"]  # r3 would fit but waits behind r2 (as the artifact does)
    assert s.num_waiting == 2 and s.waiting_by_client() == {"a": 1, "b": 1}
    assert s.remove("r2").request_id == "r2" and s.remove("r2") is None
    assert admit_all(s) == ["r3"]
    # Preempted requests go back to the front, newest requeued first keeps their order.
    s.requeue(req("r1", "b", 3))
    s.requeue(req("r0", "a", 5))
    s.add(req("r4", "a"), 6.0)
    assert admit_all(s) == ["r0", "r1", "r4"]
    assert s.counters() == s.service() == {"a": 5 + 4, "b": 3 + 2}  # prompts charged once, at w_p = 1


def test_vtc_serves_the_smallest_counter_and_lifts_a_returning_client():
    s = make_scheduler("vtc")
    for i in range(3):
        s.add(req(f"a{i}", "a", 10), 0.0)
    assert admit_n(s, 2) == ["a0", "a1"]
    s.on_decode([req("a0", "a", 10)] * 1 + [req("a1", "a", 10)] * 2)
    assert s.counters() == {"a": 10 + 10 + 3 * 2}
    # b arrives while a still waits: lifted from 0 to a's counter, so it has no credit from idleness.
    s.add(req("b0", "b", 6), 1.0)
    assert s.counters()["b"] == 26
    # Tie: the client seen first wins.
    assert admit_n(s, 1) == ["a2"]
    assert admit_n(s, 1) == ["b0"]
    assert s.counters() == {"a": 36, "b": 32}
    # Nobody waits: a client arriving now keeps its own counter (the artifact has no lift then).
    s.add(req("c0", "c", 3), 2.0)
    assert s.counters()["c"] == 0
    # A client whose queue was not empty is not lifted again.
    s.add(req("c1", "c", 3), 2.0)
    s.add(req("a3", "a", 3), 2.0)  # a's queue was empty: lifted to min over waiting others = c's 0, stays 36
    assert s.counters()["a"] == 36 and s.counters()["c"] == 0
    assert admit_all(s) == ["c0", "c1", "a3"]


def test_lcf_does_not_lift_so_an_idle_client_spends_its_credit():
    vtc, lcf = make_scheduler("vtc"), make_scheduler("lcf")
    for s in (vtc, lcf):
        for i in range(4):
            s.add(req(f"a{i}", "a", 10), 0.0)
        admit_n(s, 3)
        for i in range(4):
            s.add(req(f"b{i}", "b", 10), 1.0)
    assert vtc.counters()["b"] == 30 and lcf.counters()["b"] == 0
    assert admit_n(vtc, 4) == ["a3", "b0", "b1", "b2"]
    assert admit_n(lcf, 4) == ["b0", "b1", "b2", "a3"]


def test_requeued_requests_go_first_in_their_queue_without_a_second_prompt_charge():
    s = make_scheduler("vtc")
    s.add(req("a0", "a", 8), 0.0)
    s.add(req("a1", "a", 8), 0.0)
    assert admit_n(s, 1) == ["a0"]
    s.on_decode([req("a0", "a", 8)] * 3)
    s.requeue(req("a0", "a", 8))
    assert s.num_waiting == 2 and s.num_running == 0
    assert admit_n(s, 1) == ["a0"]
    assert s.counters()["a"] == 8 + 3 * 2 and s.service()["a"] == 8 + 3 * 2
    with pytest.raises(ValueError, match="not running"):
        s.requeue(req("a1", "a", 8))


@pytest.mark.parametrize("name", ["vtc", "vtc_predict", "fcfs"])
def test_finishing_before_or_after_reporting_the_last_tokens_charges_the_same(name):
    finish_first, decode_first = make_scheduler(name), make_scheduler(name)
    for s in (finish_first, decode_first):
        for i in range(3):
            s.add(req(f"a{i}", "a", 6), 0.0)
    for i, n_out in enumerate([5, 9, 2]):
        r = req(f"a{i}", "a", 6)
        for s in (finish_first, decode_first):
            admit_n(s, 1)
            s.on_decode([r] * (n_out - 1))
        finish_first.on_finish(r, n_out)
        finish_first.on_decode([r])  # the step's report comes after the request ended: already settled
        decode_first.on_decode([r])
        decode_first.on_finish(r, n_out)
        assert finish_first.counters() == decode_first.counters()
    assert finish_first.service()["a"] == 3 * 6 + 2 * (5 + 9 + 2)
    assert finish_first.num_running == 0


def test_weighted_vtc_gives_shares_in_proportion_to_weights():
    weights = {"a": 1.0, "b": 2.0, "c": 4.0}
    s = make_scheduler("vtc_weighted", weights=weights)
    rng = random.Random(0)
    n = {c: 0 for c in weights}
    running = []
    for step in range(3000):
        for c in weights:  # every client always has work waiting
            while sum(1 for r in s._waiting.values() if r.client == c) < 2:
                n[c] += 1
                s.add(req(f"{c}{n[c]}", c, rng.randint(4, 12)), float(step))
        running += [[r, rng.randint(1, 20)] for r in s.admit(at_most(4 - len(running)), float(step))]
        assert len(running) <= 4
        s.on_decode([r for r, _ in running])
        for item in running:
            item[1] -= 1
        for r, left in running:
            if left == 0:
                s.on_finish(r, 0)
        running = [item for item in running if item[1] > 0]
    service = s.service()
    total = sum(service.values())
    for c, w in weights.items():
        # Within 3% of the ideal share: the counters differ by at most a request or so out of ~28k tokens.
        assert service[c] / total == pytest.approx(w / sum(weights.values()), rel=0.03)


def test_length_prediction_charges_up_front_and_refunds():
    s = make_scheduler("vtc_predict")
    r = [req(f"a{i}", "a", 5) for i in range(3)]
    for x in r:
        s.add(x, 0.0)
    assert admit_n(s, 1) == ["a0"]
    assert s.counters()["a"] == 5  # no prediction yet
    s.on_decode([r[0]] * 10)
    s.on_finish(r[0], 10)
    assert s.counters()["a"] == 5 + 20 and s._predicted_len["a"] == 10
    # Second request: prompt plus 10 predicted tokens up front; the 4 it makes are already paid;
    # it ends 6 short: refunded 6 * w_q.
    admit_n(s, 1)
    assert s.counters()["a"] == 25 + 5 + 20
    s.on_decode([r[1]] * 4)
    assert s.counters()["a"] == 50
    s.on_finish(r[1], 4)
    assert s.counters()["a"] == 50 - 12
    assert s._predicted_len["a"] == pytest.approx((4 * 10 + 4) / 5)
    # Third: past the prediction (8.8) every token is charged: tokens 9..12.
    admit_n(s, 1)
    s.on_decode([r[2]] * 12)
    s.on_finish(r[2], 12)
    assert s.counters()["a"] == pytest.approx(38 + 5 + 2 * 8.8 + 2 * 4)
    assert s.service()["a"] == 3 * 5 + 2 * (10 + 4 + 12)  # what was really served


def test_rpm_refuses_over_the_limit_within_sixty_seconds():
    s = make_scheduler("rpm", rpm_limit=3)
    for i, t in enumerate([0.0, 10.0, 20.0]):
        s.add(req(f"a{i}", "a"), t)
    with pytest.raises(RateLimited, match="3 requests per minute"):
        s.add(req("a3", "a"), 30.0)
    s.add(req("b0", "b"), 30.0)  # limits are per client
    with pytest.raises(RateLimited):
        s.add(req("a4", "a"), 60.0)  # the request at t=0 is still within 60 s
    s.add(req("a5", "a"), 60.5)
    assert isinstance(RateLimited("x"), ValueError)
    assert s.refused == {"a": 2} and s.num_waiting == 5
    assert admit_all(s, 61.0) == ["a0", "a1", "a2", "b0", "a5"]


def test_profile_cost_charges_the_fitted_cost_of_the_whole_request():
    s = make_scheduler("vtc", cost="profile")
    s.add(req("a0", "a", 30), 0.0)
    admit_all(s)
    s.on_decode([req("a0", "a", 30)] * 17)
    assert s.counters()["a"] == pytest.approx(ProfileCost().h(30, 17), rel=1e-12)


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("sjf")
    with pytest.raises(ValueError, match="rpm_limit"):
        make_scheduler("rpm")
    with pytest.raises(ValueError, match="rpm_limit"):
        make_scheduler("vtc", rpm_limit=5)
    with pytest.raises(ValueError, match="positive integer"):
        make_scheduler("rpm", rpm_limit=0)
    with pytest.raises(ValueError, match="needs weights"):
        make_scheduler("vtc_weighted")
    with pytest.raises(ValueError, match="weight must be positive"):
        make_scheduler("vtc", weights={"a": 0})
    with pytest.raises(ValueError, match="cost function"):
        make_scheduler("vtc", cost="quadratic")
    s = make_scheduler("fcfs")
    s.add(req("x", "a"), 0.0)
    with pytest.raises(ValueError, match="already"):
        s.add(req("x", "b"), 0.0)


class ArtifactVTC:
    """The artifact's VTCReqQueue / LCFReqQueue restated (linear cost), with the documented
    differences: one w_q charge per output token, admission limited by a `fits` callback."""

    def __init__(self, lift, fairw, input_price=1, output_price=2):
        self.lift, self.fairw = lift, fairw
        self.input_price, self.output_price = input_price, output_price
        self.served, self.user_req_list = {}, {}

    def append(self, req):
        c = req.client
        if c not in self.user_req_list:
            self.user_req_list[c] = collections.deque([req])
            self.served[c] = 0
        else:
            self.user_req_list[c].append(req)
        if self.lift and len(self.user_req_list[c]) == 1:
            cnts = [v for k, v in self.served.items() if len(self.user_req_list[k]) > 0 and k != c]
            if len(cnts) > 0:
                self.served[c] = max(self.served[c], min(cnts))

    def generate_new_batch(self, fits):
        can_run = []
        active_served = dict(self.served)
        while active_served:
            c = min(active_served, key=active_served.get)
            if len(self.user_req_list[c]) > 0:
                r = self.user_req_list[c][0]
                if not fits(r):
                    break
                can_run.append(r)
                self.user_req_list[c].popleft()
                delta = len(r.prompt_ids) * self.input_price / self.fairw.get(c, 1)
                self.served[c] += delta
                active_served[c] += delta
            else:
                del active_served[c]
        return can_run

    def update_counter(self, reqs):
        for r in reqs:
            self.served[r.client] += self.output_price / self.fairw.get(r.client, 1)


@pytest.mark.parametrize("name,lift", [("vtc", True), ("lcf", False)])
@pytest.mark.parametrize("seed", range(3))
def test_vtc_and_lcf_match_the_artifact_under_random_traffic(name, lift, seed):
    rng = random.Random(seed)
    weights = {"a": 1.0, "b": 2.5, "c": 1.0, "d": 0.5}
    ours = make_scheduler(name, weights=weights)
    ref = ArtifactVTC(lift, weights)
    running, n = [], 0
    for step in range(400):
        for _ in range(rng.choice([0, 0, 1, 2])):
            n += 1
            r = req(f"r{n}", rng.choice("abcd"), rng.randint(1, 30))
            ours.add(r, float(step))
            ref.append(r)
        capacity = rng.randint(0, 3)  # the same answers to both: a random number of slots this step
        got = ours.admit(at_most(capacity), float(step))
        want = ref.generate_new_batch(at_most(capacity))
        assert [r.request_id for r in got] == [r.request_id for r in want]
        running += [[r, rng.randint(1, 8)] for r in got]
        ours.on_decode([r for r, _ in running])
        ref.update_counter([r for r, _ in running])
        for item in running:
            item[1] -= 1
            if item[1] == 0:
                ours.on_finish(item[0], 0)
        running = [item for item in running if item[1] > 0]
        assert ours.counters() == pytest.approx(ref.served, rel=1e-12)
    assert n > 200 and sum(len(q) for q in ref.user_req_list.values()) == ours.num_waiting
