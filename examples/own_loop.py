"""Add codistillation to your own PyTorch training loop.

This is an ordinary training loop (model, optimiser, batches, loss) plus four p2pcod lines:
Session.join, session.distill_loss, session.step, session.close. Here the model and the data come
from p2pcod's `lm` task so that the script can join a swarm of `p2pcod peer --config
peers/lm-tiny.toml` processes; with your own model, pass your own model config and factory.

    python examples/own_loop.py --join /ip4/127.0.0.1/tcp/31337/p2p/12D3KooW... --steps 200
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from p2pcod.config import load_recipe
from p2pcod.session import Session
from p2pcod.tasks import get_task


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--join", action="append", default=[], help="multiaddr of a peer in the swarm")
    ap.add_argument("--listen", action="append", default=[],
                    help="where to listen (default /ip4/0.0.0.0/tcp/0: reachable from other machines)")
    ap.add_argument("--swarm", default="p2pcod")
    ap.add_argument("--name", default="own-loop")
    ap.add_argument("--config", default="peers/lm-tiny.toml")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--run-dir", default="runs/own-loop")
    ap.add_argument("--set", action="append", default=[], help="recipe override, as for p2pcod peer")
    args = ap.parse_args()

    recipe = load_recipe(args.config, args.set)
    task = get_task(recipe.task)

    # --- your model, data and optimiser ---
    torch.manual_seed(1)
    model = task.build_model(recipe.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = task.train_batches(0, 1, split="same", batch_size=16, seed=1)

    # --- p2pcod: join the swarm ---
    session = Session.join(
        swarm=args.swarm, name=args.name, identity_dir=f"{args.run_dir}/identity", initial_peers=args.join,
        host_maddrs=args.listen or ["/ip4/0.0.0.0/tcp/0"], model=model, model_cfg=recipe.model, task=task.name,
        build_model=task.build_model, kind=task.kind, distill_cfg=recipe.distill, exchange=recipe.exchange,
    )
    try:
        for step in range(1, args.steps + 1):
            batch = next(batches)
            logits = model(batch.x)
            loss = F.cross_entropy(logits.flatten(0, 1), batch.y.flatten())
            distill_loss = session.distill_loss(logits, batch.x, step)  # zero until teachers arrive
            optimizer.zero_grad()
            (loss + distill_loss).backward()
            optimizer.step()
            session.step(step)  # publishes every exchange.reload_every steps
            if step % 25 == 0:
                print(json.dumps({"step": step, "loss": round(float(loss), 4),
                                  "distill_loss": round(float(distill_loss), 4), **session.stats()}), flush=True)
    finally:
        session.close()


if __name__ == "__main__":
    main()
