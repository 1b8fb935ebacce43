"""Cost of one `lr(t)` call of SGDR far into a run, with cycle lengths that grow slowly (T_mult = 1.0001: about
69,000 cycles below t = 10^7) against the common T_mult = 2, in one run, and their ratio; and of a warmup in every
one of 10^5 cycles (`warmup_every_cycle`) against the same SGDR without it; and of adaptive SGDR's schedule after
an extension (its 10^5 cycle lengths spelled out, schedules.CosineCycles) against the SGDR it came from.

    python scripts/bench_schedule.py            # CPU, a few seconds
"""

import time

from snapens.adaptive import extend_cycle, with_cycle_lengths
from snapens.schedules import SGDR, Warmup

T, CALLS = 10**7, 20_000


def microseconds_per_call(schedule, t: int = T) -> float:
    schedule.lr(t)  # the first call walks the cycles once; later calls bisect the starts found
    start = time.perf_counter()
    for k in range(CALLS):
        schedule.lr(t - k)
    return (time.perf_counter() - start) / CALLS * 1e6


def main() -> None:
    slow = microseconds_per_call(SGDR(0.1, 10, 2 * T, T_mult=1.0001, eta_min=0.001))
    usual = microseconds_per_call(SGDR(0.1, 10, 2 * T, T_mult=2, eta_min=0.001))
    print(f"SGDR lr(t) at t ~ 1e7: T_mult=1.0001 {slow:.2f} us/call, T_mult=2 {usual:.2f} us/call, "
          f"ratio {slow / usual:.2f}x")
    cycles = SGDR(0.1, 10, 10**6, T_mult=1, eta_min=0.001)  # 10^5 cycles of 10 steps
    warm, bare = microseconds_per_call(Warmup(cycles, 3, every_cycle=True), 10**6 - 1), \
        microseconds_per_call(cycles, 10**6 - 1)
    print(f"10^5 cycles, lr(t) near the end: warmup every cycle {warm:.2f} us/call, without {bare:.2f} us/call, "
          f"ratio {warm / bare:.2f}x")
    adapted = with_cycle_lengths(cycles, extend_cycle(tuple([10] * 10**5), 50_000, 2.0))
    spelled = microseconds_per_call(adapted, 10**6 - 1)
    print(f"10^5 cycles, lr(t) near the end: adaptive SGDR after an extension {spelled:.2f} us/call, SGDR "
          f"{bare:.2f} us/call, ratio {spelled / bare:.2f}x")


if __name__ == "__main__":
    main()
