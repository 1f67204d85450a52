"""`edgeloop distill`: one distillation cycle against the cloud's store, from the shell.

It reads the same configuration as `edgeloop cloud serve` (store, data directory, signing
key), trains, gates and, when the gate passes, publishes a signed bundle whose rollout starts
as a canary. Running servers pick the publication up (at once on PostgreSQL through
LISTEN/NOTIFY, within `rollout.poll_s` otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    from cloud_agent.cli import ENV_PREFIX
    from cloud_agent.distill.train import DEFAULT_TARGETS

    parser = subparsers.add_parser(
        "distill",
        help="train, gate and publish a LoRA adapter from the cloud's interactions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", type=Path, help=f"cloud TOML file; environment variables {ENV_PREFIX}* win"
    )
    parser.add_argument("--data-dir", type=Path, help="the cloud's data directory")
    parser.add_argument("--database-url", help="SQLAlchemy URL (default: SQLite in --data-dir)")
    parser.add_argument("--base-model", type=Path, help="the devices' GGUF (default: packaged)")
    parser.add_argument(
        "--labels", type=Path, help="labelled workload (JSON lines with text and expect)"
    )
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument(
        "--target-modules", default=",".join(DEFAULT_TARGETS), help="comma-separated projections"
    )
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout-share", type=float, default=0.2)
    parser.add_argument(
        "--min-gain",
        type=float,
        default=0.1,
        help="held-out accuracy gain over the base model needed to publish",
    )
    parser.add_argument(
        "--min-gain-over-incumbent",
        type=float,
        default=0.0,
        help="held-out accuracy gain needed over the adapter on offer now, if any (default 0: "
        "no worse)",
    )
    parser.add_argument("--canary-share", type=float, help="default: the cloud's rollout config")
    parser.add_argument("--dry-run", action="store_true", help="train and measure, do not publish")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from cloud_agent.cli import _config
    from cloud_agent.distill.dataset import expectations_from_workload
    from cloud_agent.distill.pipeline import DistillConfig
    from cloud_agent.distill.train import LoraSettings

    config = _config(args)
    lora = LoraSettings(
        rank=args.rank,
        alpha=args.alpha,
        target_modules=tuple(m.strip() for m in args.target_modules.split(",") if m.strip()),
        steps=args.steps,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=sys.stderr.isatty(),
    )
    dconfig = DistillConfig(
        base_model=args.base_model,
        lora=lora,
        heldout_share=args.heldout_share,
        min_gain=args.min_gain,
        min_gain_over_incumbent=args.min_gain_over_incumbent,
        expectations=expectations_from_workload(args.labels) if args.labels else {},
        canary_share=(
            config.rollout.canary_share if args.canary_share is None else args.canary_share
        ),
        phone_regions=config.phone_regions,
    )
    result = asyncio.run(_cycle(config, dconfig, publish=not args.dry_run))
    print(
        json.dumps(
            {
                "published": result.published,
                "version": result.version,
                "reason": result.reason,
                "metrics": result.metrics,
                "adapter": str(result.adapter_path) if result.adapter_path else None,
            },
            indent=2,
        )
    )
    return 0 if result.published or args.dry_run else 2


async def _cycle(config: Any, dconfig: Any, *, publish: bool) -> Any:
    from cloud_agent.bundles import cluster_signing_key
    from cloud_agent.distill.pipeline import distill
    from cloud_agent.store import Store

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    store = await Store.open(config.existing_database_url())
    try:
        return await distill(
            store,
            config=dconfig,
            work_dir=config.data_dir / "distill",
            bundles_dir=config.data_dir / "bundles",
            signing_key=await cluster_signing_key(config.data_dir, store),
            progress=progress,
            publish=publish,
        )
    finally:
        await store.close()
