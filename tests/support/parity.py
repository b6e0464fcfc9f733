"""Parity of trained weights, judged against the measured noise floor of fp32 arithmetic.

Adam turns rounding-level gradients into lr-sized moves: its first update is lr·g/(|g|+eps) per entry, so an
entry whose gradient is near eps moves by anything up to lr depending on the CPU's summation order (MiniMind's
own code, 1 thread against 2, moves single entries by up to 35 fp16 ulp). A fixed per-entry tolerance is then
either blind or red on some machine. So a parity test also runs the torch reference in float64 from the same
weights and batches: that is the truth, and the fp32 reference's distance from it is the floor that fp32
arithmetic reaches. Ours must be about as close to the truth as the fp32 reference, tensor by tensor:

- bulk: the 50th, 75th and 90th percentiles of |ours - truth|, in units of fp32 resolution at the tensor's
  scale (rms·2⁻²³), are at most BULK_FACTOR × (the reference's + half a unit). A wrong weight decay, eps or
  learning rate moves every entry, so it shows here;
- tail: the entries more than one fp16 ulp from the truth (the resolution of MiniMind's saved weights; these
  are Adam's ill-conditioned entries) number at most TAIL_FACTOR × the reference's + TAIL_SLACK.
"""

import numpy as np
import torch

from minimind_jax.bench.torch_reference import MiniMindTorch

BULK_QUANTILES = (0.5, 0.75, 0.9)
# Measured on the tests' runs: ours/reference at most 2.0 in the bulk; a wrong weight decay (0.011) gives
# 9-22, a wrong eps (1e-6) or lr (x1.01) hundreds. Tail counts are small and Poisson-like: ours
# exceeded twice the reference's by at most 2 entries; a wrong eps or lr puts 6-12% of all entries there.
BULK_FACTOR = 3.0
TAIL_FACTOR = 2.0
TAIL_SLACK = 8


def float64_twin(model: MiniMindTorch) -> MiniMindTorch:
    """A float64 copy of a torch reference model: train it alongside the fp32 one to get the truth."""
    twin = MiniMindTorch(model.config).double()
    twin.load_state_dict(model.state_dict())
    return twin.train(model.training)


def state_of(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {key: value.detach().numpy().copy() for key, value in model.state_dict().items()}


def distance_from_truth(weights, truth):
    """Per tensor: (bulk percentiles in fp32 units at the tensor's scale, count beyond one fp16 ulp)."""
    result = {}
    for key, exact in truth.items():
        exact = np.asarray(exact, np.float64)
        error = np.abs(np.asarray(weights[key], np.float64) - exact)
        unit = max(np.sqrt(np.mean(exact**2)), np.finfo(np.float32).tiny) * 2.0**-23
        fp16_ulp = np.spacing(np.abs(exact).astype(np.float16)).astype(np.float64)
        result[key] = (np.quantile(error / unit, BULK_QUANTILES), int((error > fp16_ulp).sum()))
    return result


def assert_near_truth(ours, reference, truth, label=""):
    """`ours`, `reference` (the fp32 run) and `truth` (the float64 run): dicts of arrays with the same keys."""
    ours_distance, floor = distance_from_truth(ours, truth), distance_from_truth(reference, truth)
    failures = []
    for key, (bulk, tail) in ours_distance.items():
        floor_bulk, floor_tail = floor[key]
        if np.any(bulk > BULK_FACTOR * (floor_bulk + 0.5)):
            failures.append(f"{key}: bulk error {np.round(bulk, 2)} fp32 units, reference {np.round(floor_bulk, 2)}")
        if tail > TAIL_FACTOR * floor_tail + TAIL_SLACK:
            failures.append(f"{key}: {tail} entries beyond 1 fp16 ulp, reference {floor_tail}")
    assert not failures, f"{label} farther from the float64 truth than the fp32 reference:\n" + "\n".join(failures)


def assert_scalar_near_truth(name, ours, reference, truth, rtol=1e-5):
    """A loss or gradient norm: within rtol of the truth, or, after updates that moved Adam's ill-conditioned
    entries differently in each run, within BULK_FACTOR × the fp32 reference's own distance from it."""
    bound = max(rtol * abs(truth), BULK_FACTOR * abs(reference - truth))
    assert abs(ours - truth) <= bound, (
        f"{name}: {ours} vs float64 {truth} (fp32 reference {reference}, bound {bound:.3g})"
    )


def fraction_beyond_one_fp16_ulp(ours: dict, theirs: dict) -> float:
    """../shared/golden/rl/README.md's measure for two torch state dicts: each entry's distance in fp16 units in
    the last place after rounding both to fp16, and the fraction of all entries (every key) more than one apart."""
    beyond = total = 0
    for key, want in theirs.items():
        x, y = (np.asarray(t.half().double().numpy()) for t in (ours[key], want))
        scale = np.maximum(np.maximum(np.abs(x), np.abs(y)), 2.0**-14)
        beyond += int((np.abs(x - y) / 2.0 ** (np.floor(np.log2(scale)) - 10) > 1).sum())
        total += want.numel()
    return beyond / total
