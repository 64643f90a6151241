"""SAC with target critics vs CrossQ with Batch Renormalization critics on gymnasium's Pendulum-v1.

CrossQ (Bhatt et al., ICLR 2024) drops SAC's target networks and normalizes the critic, evaluating (s, a) and
(s', a') in one forward pass so that the normalization statistics cover both. The critic's BatchRenorm1d
layers run as plain BN for a warm-up and then switch to r_max 3, d_max 5 (``BRNSchedule``, the ports'
schedule, here after 500 updates instead of 100 000). Prints the evaluation return against environment steps.
Needs ``pip install 'normkit[rl]'``; a few minutes on 2 CPU cores. The full study (four arms, five seeds):
``normkit compare --suite crossq --jobs 2``.

    python examples/crossq_pendulum.py [--steps 5000] [--seed 0]
"""

from __future__ import annotations

import argparse

from normkit.train.rl import CrossQConfig, run_rl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000, help="environment steps per agent")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    common = dict(
        total_steps=args.steps,
        learning_starts=min(500, args.steps // 2),
        eval_every=max(1, args.steps // 10),
        batch_size=128,
        actor_width=128,
        critic_width=128,
        seed=args.seed,
    )
    agents = {
        # SAC as published: target critics (Polyak τ = 0.005), Adam β1 = 0.9, actor update every step
        "SAC + target nets": CrossQConfig(
            algorithm="sac", critic_norm="none", adam_beta1=0.9, policy_delay=1, **common
        ),
        # CrossQ: no target network, joint (s, a)/(s', a') pass, BRN critics, Adam β1 = 0.5, policy delay 3
        "CrossQ + BRN": CrossQConfig(algorithm="crossq", critic_norm="brn", brn_warmup_steps=500, **common),
    }
    results = {}
    for name, cfg in agents.items():
        print(f"{name}:")
        results[name] = run_rl(cfg, log=lambda line: print("  " + line, flush=True))
    print("\nenv steps | " + " | ".join(results))
    first = next(iter(results.values()))
    for i, point in enumerate(first.curve):
        returns = " | ".join(f"{r.curve[i]['return']:.0f}" for r in results.values())
        print(f"{point['step']:>9} | {returns}")
    for name, r in results.items():
        print(f"{name}: final return {r.final_return:.0f}, wall time {r.wall_time:.0f} s")


if __name__ == "__main__":
    main()
