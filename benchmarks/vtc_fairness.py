"""Fairness of each scheduler in the virtual-time simulation (serving/fairness_sim.py).

For the paper's headline case (two clients at 1.5 and 3 req/s, 256 in / 256 out, overloaded), an
on/off case and a weighted case: the largest and mean service difference between clients while
both are backlogged (service w_p·in + w_q·out over the client's weight), against the VTC bound
2·max(w_p·L_input, w_q·M); throughput as a ratio to FCFS run on the same arrivals; requests the
RPM limit refused; time the server sat idle; each client's share of the service.

    python benchmarks/vtc_fairness.py [--duration 360] [--rpm-limit 30] [--cases overload on_off weighted]
"""

from __future__ import annotations

import argparse
import dataclasses

from serving.fairness_sim import CASES, EngineModel, fairness_bound, simulate

SCHEDULERS = ("fcfs", "rpm", "lcf", "vtc", "vtc_predict")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=360.0, help="virtual seconds per run")
    parser.add_argument("--rpm-limit", type=int, default=30, help="requests per minute per client for 'rpm'")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    engine = EngineModel()
    print(f"engine model: step = {engine.step_overhead_s * 1e3:g} ms + {engine.per_token_s * 1e6:g} us/token, "
          f"{engine.token_budget} tokens/step, {engine.max_running} running, KV pool {engine.kv_capacity} tokens")
    header = (f"{'case':<9} {'scheduler':<12} {'max diff':>9} {'avg diff':>9} {'bound':>7} {'in':>3} "
              f"{'tok/s':>7} {'vs fcfs':>7} {'refused':>7} {'idle s':>6}  service share")
    print(header)
    print("-" * len(header))
    for name in args.cases:
        case = dataclasses.replace(CASES[name], duration_s=args.duration)
        bound = fairness_bound(case, engine)
        baseline = None
        for sched in SCHEDULERS:
            res = simulate(sched, case, engine, seed=args.seed, rpm_limit=args.rpm_limit if sched == "rpm" else None)
            baseline = baseline or res.throughput
            total = sum(res.service.values()) or 1.0
            share = " ".join(f"{c.name}:{res.service.get(c.name, 0.0) / total:.2f}" for c in case.clients)
            within = "yes" if res.max_diff <= bound else "no"
            print(f"{name:<9} {sched:<12} {res.max_diff:>9.0f} {res.avg_diff:>9.0f} {bound:>7.0f} {within:>3} "
                  f"{res.throughput:>7.0f} {res.throughput / baseline:>7.3f} {sum(res.refused.values()):>7d} "
                  f"{res.idle_s:>6.1f}  {share}")


if __name__ == "__main__":
    main()
