"""SATAC gradient updates per second: our jitted chunk against a plain PyTorch loop, and seeds vmapped.

Both sides run the same update (algorithms/control/satac.py, main phase, bc_safe reference): twin reward and
twin cost critics and a tanh-Gaussian actor, 3 x 256 ReLU MLPs, batch 256, Adam, ATAC's 0.5 TD +
0.5 residual Bellman error, relative pessimism, L2-ball projection and Polyak targets, alpha tuning,
the rectified cost penalty against a reference actor. PyTorch samples its minibatches from a
dataset held in memory, as usual; ours are sampled on the device inside the ``lax.scan``.

    python -m benchmarks.satac_vs_torch [--updates 200] [--seeds 5] [--width 256] [--threads N]
                                        [--torch-device cpu|cuda] [--torch-compile]

``--torch-compile`` also times the same PyTorch code with its losses, projection and the critics' and
actor's Adam steps under ``torch.compile`` (the peer that a user who compiles would write; the target is against the plain loop).

On a GPU both sides run there (PyTorch's index sampling too, so neither loop waits for the host).

Prints updates/s of each, their ratio (target >= 2x), the time of ``--seeds`` vmapped seeds relative
to one (target <= 2.5x; ``--seeds 1`` skips it), and the arithmetic rate of both against the CPU's
matrix-multiply ceiling (the best of large float32 products, 1024 and 2048 square, timed in the same
run, each timing as much work as a timed chunk): XLA's whole operation count, and the matrix products
alone (every ``dot`` of the compiled update's HLO, ``2 * prod(output) * prod(contracted)``), whose rate
over the ceiling is the JAX run's share of it (target >= 85%). Vmapped seeds cost less than their count only where one seed leaves the
hardware idle.
"""

from __future__ import annotations

import argparse
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from algorithms.control import offline, satac
from constrained_rl.data import dsrl

OBS, ACT, BATCH, ROWS = 8, 2, 256, 50_000
PROTOCOL_WIDTH = 256  # ATAC's 3 x 256 MLPs


def make_dataset() -> dsrl.OfflineDataset:
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (ROWS, ACT)).astype(np.float32)
    return dsrl.offline_dataset_from_arrays({
        "observations": rng.normal(size=(ROWS, OBS)).astype(np.float32),
        "next_observations": rng.normal(size=(ROWS, OBS)).astype(np.float32),
        "actions": actions, "rewards": actions[:, 0], "costs": (actions[:, 1] > 0.5).astype(np.float32),
        "terminals": np.zeros(ROWS, bool), "timeouts": (np.arange(ROWS) % 200 == 199),
    })


# --------------------------------------------------------------------------------------------------
# JAX: the project's chunk


def time_jax(num_seeds: int, updates: int, repeats: int, hidden: tuple[int, ...]) -> tuple[float, float, float]:
    """Seconds per chunk of ``updates`` updates of ``num_seeds`` vmapped runs (best of ``repeats``), the
    floating-point operations of one such update of all the runs as XLA counts them, and those of its
    matrix products alone."""
    config = satac.Config(hidden_sizes=hidden, batch_size=BATCH, cost_limits=(20.0,), num_seeds=num_seeds,
                          actor_learning_rate=1e-4)
    dataset = make_dataset()
    algorithm = satac.make_algorithm(config, offline.Problem(OBS, ACT, 200))
    layout = offline.run_layout(config.cost_limits, num_seeds)
    state = offline.init_runs(algorithm, offline.seed_keys(0, layout.seed_indices), layout.cost_limits)
    rows = offline.row_sets(dataset, "all", layout)
    chunk = offline.make_chunk(algorithm.phases[-1].update, BATCH, updates)
    one_update = offline.make_chunk(algorithm.phases[-1].update, BATCH, 1).lower(state, rows, dataset).compile()
    flops, dot_flops = float(one_update.cost_analysis()["flops"]), matmul_flops(one_update.as_text())
    state, _ = chunk(state, rows, dataset)  # compile
    jax.block_until_ready(state)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = chunk(state, rows, dataset)
        jax.block_until_ready((state, metrics))
        best = min(best, time.perf_counter() - start)
    return best, flops, dot_flops


_SHAPE = re.compile(r"%(\S+) = \w+\[([\d,]*)\]")
_DOT = re.compile(r"\[([\d,]*)\]\S* dot\(%([^,\s)]+), %[^,\s)]+\).*?lhs_contracting_dims=\{([\d,]*)\}")


def matmul_flops(hlo_text: str) -> float:
    """The multiply-adds of every ``dot`` in a compiled program's HLO, ``2 * prod(output) * prod(the
    contracted dimensions of the left operand)`` (batch dimensions are in the output). A while loop's
    body counts once, whatever its trip count: for a one-update chunk, one update."""
    dims = lambda text: [int(d) for d in text.split(",") if d]
    shapes = {name: dims(shape) for name, shape in _SHAPE.findall(hlo_text)}
    total = 0.0
    for output, lhs, contracting in _DOT.findall(hlo_text):
        total += 2 * math.prod(dims(output)) * math.prod(shapes[lhs][d] for d in dims(contracting))
    return total


def matmul_flops_per_second(work: float, sizes: tuple[int, ...] = (1024, 2048), repeats: int = 2
                            ) -> tuple[float, int]:
    """The CPU's attainable rate on large float32 matrix products (the best over ``sizes``): the ceiling
    a compute-bound update can approach. Each timing is one compiled loop of back-to-back products
    ``x <- q x`` (``q`` orthogonal, so ``x`` neither grows nor vanishes, and each product needs the
    last) doing about ``work`` operations, the timed chunk's, so that both windows are as long and as
    exposed to other load. Returns the rate and the size that reached it."""
    best_rate, best_size = 0.0, sizes[0]
    for size in sizes:
        q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (size, size)))
        steps = max(1, round(work / (2 * size**3)))
        products = jax.jit(lambda x: jax.lax.fori_loop(0, steps, lambda _, y: q @ y, x))
        x = jax.random.normal(jax.random.key(1), (size, size))
        jax.block_until_ready(products(x))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(products(x))
            best = min(best, time.perf_counter() - start)
        if 2 * size**3 * steps / best > best_rate:
            best_rate, best_size = 2 * size**3 * steps / best, size
    return best_rate, best_size


# --------------------------------------------------------------------------------------------------
# PyTorch: the same update, written plainly


def mlp(inputs: int, outputs: int, hidden: tuple[int, ...]) -> nn.Sequential:
    layers, width = [], inputs
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, outputs))


class TwinQ(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.heads = nn.ModuleList([mlp(OBS + ACT, 1, hidden), mlp(OBS + ACT, 1, hidden)])

    def forward(self, obs, act):
        x = torch.cat([obs, act], -1)
        return torch.stack([h(x)[..., 0] for h in self.heads])


def sample_action(actor, obs):
    mean, log_std = actor(obs).chunk(2, -1)
    log_std = log_std.clamp(-5.0, 2.0)
    u = mean + log_std.exp() * torch.randn_like(mean)
    log_prob = (-0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)
    log_prob = log_prob - (2 * (np.log(2) - u - nn.functional.softplus(-2 * u))).sum(-1)
    return torch.tanh(u), log_prob


def normalized_sum(loss, reg, w):
    return loss / w + reg if w > 1 else loss + w * reg


class TorchSATAC:
    def __init__(self, hidden, device, beta=4.0, lam=1.0, gamma=0.99, tau=5e-3):
        self.actor, self.reference = mlp(OBS, 2 * ACT, hidden).to(device), mlp(OBS, 2 * ACT, hidden).to(device)
        self.qr, self.qc = TwinQ(hidden).to(device), TwinQ(hidden).to(device)
        self.qr_target, self.qc_target = TwinQ(hidden).to(device), TwinQ(hidden).to(device)
        self.qr_target.load_state_dict(self.qr.state_dict())
        self.qc_target.load_state_dict(self.qc.state_dict())
        self.log_alpha = torch.zeros((), device=device, requires_grad=True)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=1e-4)
        self.critic_opt = torch.optim.Adam([*self.qr.parameters(), *self.qc.parameters()], lr=5e-4)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=5e-4)  # alpha at the critics' rate (ATAC)
        self.beta, self.lam, self.gamma, self.tau = beta, lam, gamma, tau

    def critic_loss(self, q, target_q, signal, disc, s, a, s2, a_pi, a2, reduce, sign):
        with torch.no_grad():
            td_target = signal + disc * reduce(target_q(s2, a2))
        q_data, q_pi, q_next = q(s, a), q(s, a_pi), q(s2, a2)
        total = 0.0
        for e in range(2):
            bellman = 0.5 * ((q_data[e] - td_target) ** 2).mean() + 0.5 * (
                (q_data[e] - signal - disc * q_next[e]) ** 2).mean()
            total = total + normalized_sum(sign * (q_pi[e] - q_data[e]).mean(), bellman, self.beta)
        return total

    def critic_total(self, s, a, r, c, s2, d):
        disc = self.gamma * (1 - d)
        with torch.no_grad():
            a_pi, _ = sample_action(self.actor, s)
            a2, _ = sample_action(self.actor, s2)
        return (self.critic_loss(self.qr, self.qr_target, r, disc, s, a, s2, a_pi, a2, lambda q: q.min(0).values, 1.0)
                + self.critic_loss(self.qc, self.qc_target, c, disc, s, a, s2, a_pi, a2, lambda q: q.max(0).values,
                                   -self.lam))

    @torch.no_grad()
    def project_and_track(self):
        for net, target in ((self.qr, self.qr_target), (self.qc, self.qc_target)):
            for layer in net.modules():
                if isinstance(layer, nn.Linear):
                    layer.weight.mul_(torch.clamp(100.0 / layer.weight.norm(), max=1.0))
            for p, tp in zip(net.parameters(), target.parameters()):
                tp.mul_(1 - self.tau).add_(self.tau * p)

    def actor_objective(self, s):
        new_a, log_prob = sample_action(self.actor, s)
        with torch.no_grad():
            ref_mean, _ = self.reference(s).chunk(2, -1)
            q_ref = self.qc(s, torch.tanh(ref_mean)).max(0).values
        objective = self.qr(s, new_a)[0].mean() - self.lam * torch.relu(self.qc(s, new_a).max(0).values - q_ref).mean()
        return objective, log_prob

    def compile(self):
        """``torch.compile`` (TorchInductor) on the loss computations, the projection and Polyak step, and
        the critics' and actor's Adam steps (alpha's one-parameter step stays eager); the backward passes
        run as the compiled graphs' own backward."""
        self.critic_total = torch.compile(self.critic_total)
        self.project_and_track = torch.compile(self.project_and_track)
        self.actor_objective = torch.compile(self.actor_objective)
        for optimizer in (self.critic_opt, self.actor_opt):
            optimizer.step = torch.compile(optimizer.step)

    def update(self, batch):
        s, a, r, c, s2, d = batch
        loss = self.critic_total(s, a, r, c, s2, d)
        self.critic_opt.zero_grad()
        loss.backward()
        self.critic_opt.step()
        self.project_and_track()
        objective, log_prob = self.actor_objective(s)
        alpha_loss = self.log_alpha * (-log_prob.mean().detach() + ACT)
        self.alpha_opt.zero_grad()
        alpha_loss.backward()
        self.alpha_opt.step()
        actor_loss = normalized_sum(-objective, log_prob.mean(), self.log_alpha.exp().detach())
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()


def time_torch(updates: int, repeats: int, hidden: tuple[int, ...], device: str, compiled: bool = False) -> float:
    dataset = make_dataset()
    data = [torch.as_tensor(np.array(x), device=device)
            for x in (dataset.observations, dataset.actions, dataset.rewards, dataset.costs,
                      dataset.next_observations, dataset.terminals)]
    learner = TorchSATAC(hidden, device)
    if compiled:
        learner.compile()
    generator = torch.Generator(device=device).manual_seed(0)

    def run(n):
        # Indices drawn where the data lives: on a GPU the loop never waits for the host.
        for _ in range(n):
            index = torch.randint(0, ROWS, (BATCH,), generator=generator, device=device)
            learner.update([x[index] for x in data])
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    run(5)  # warm up the allocator (and compile)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(updates)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=200, help="updates per timed chunk")
    parser.add_argument("--seeds", type=int, default=5, help="seeds vmapped in the scaling comparison (1: skip it)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (best kept)")
    parser.add_argument("--width", type=int, default=PROTOCOL_WIDTH,
                        help="units in each of the three hidden layers of every network (protocol: 256)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--torch-compile", action="store_true",
                        help="also time the PyTorch loop with its losses, projection and Adam steps under torch.compile")
    parser.add_argument("--torch-device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the PyTorch side runs (default: the GPU when torch sees one)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    hidden = (args.width,) * 3
    print(f"JAX on {jax.devices()[0].device_kind}, PyTorch on {args.torch_device} "
          f"({torch.get_num_threads()} threads), batch {BATCH}, MLPs {hidden}, "
          f"{args.updates} updates per timing, best of {args.repeats}", flush=True)
    # Each figure is printed as soon as it is measured: a run cut short still reports what it timed.
    torch_seconds = time_torch(args.updates, args.repeats, hidden, args.torch_device)
    print(f"PyTorch loop:       {args.updates / torch_seconds:8.1f} updates/s", flush=True)
    jax_seconds, jax_flops, jax_dot_flops = time_jax(1, args.updates, args.repeats, hidden)
    print(f"JAX chunk (1 seed): {args.updates / jax_seconds:8.1f} updates/s", flush=True)
    print(f"speed-up JAX / PyTorch: {torch_seconds / jax_seconds:.2f}x (target >= 2x)", flush=True)
    if args.torch_compile:
        compiled_seconds = time_torch(args.updates, args.repeats, hidden, args.torch_device, compiled=True)
        print(f"PyTorch compiled:   {args.updates / compiled_seconds:8.1f} updates/s; "
              f"JAX / compiled PyTorch: {compiled_seconds / jax_seconds:.2f}x", flush=True)
    runs = [("1 seed", jax_flops, jax_dot_flops, jax_seconds)]
    if args.seeds > 1:
        many_seconds, many_flops, many_dot_flops = time_jax(args.seeds, args.updates, args.repeats, hidden)
        print(f"{args.seeds} seeds vmapped: {args.seeds * args.updates / many_seconds:8.1f} run-updates/s; "
              f"time {many_seconds / jax_seconds:.2f}x one seed's (target <= 2.5x)", flush=True)
        runs.append((f"{args.seeds} seeds", many_flops, many_dot_flops, many_seconds))
    ceiling, size = matmul_flops_per_second(jax_dot_flops * args.updates)
    print(f"float32 matrix product {size} x {size}: {ceiling / 1e9:.1f} GFLOP/s (the attainable ceiling)")
    # Vmapped seeds can cost less than their count only while one seed leaves the hardware idle.
    for label, flops, dot_flops, seconds in runs:
        rate, dot_rate = flops * args.updates / seconds, dot_flops * args.updates / seconds
        print(f"{label}: {flops / 1e9:.2f} GFLOP per update ({dot_flops / 1e9:.2f} in matrix products), "
              f"{rate / 1e9:.1f} GFLOP/s; matrix products at {dot_rate / 1e9:.1f} GFLOP/s, "
              f"{100 * dot_rate / ceiling:.0f}% of the ceiling (target >= 85%)")
    torch_share = jax_dot_flops * args.updates / torch_seconds / ceiling
    print(f"PyTorch loop, the same matrix products: {100 * torch_share:.0f}% of the ceiling")


if __name__ == "__main__":
    main()
