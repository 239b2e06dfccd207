"""Every sampler's steps as rows of guided_step coefficients, built on the host in float64.

A plan is the whole run decided before the first model call: the timestep each
model call sees, the coefficient row of each update, which earlier tensors (the
sample a step started from, or a step's ``denoised`` output) it combines, and
whether it draws noise. The loop in samplers.py only executes it, so it holds no
sampler arithmetic and no host syncs.

All samplers keep their state in the model's input space (variance-preserving
x_t = alpha * x0 + sigma * eps). The sigma-parameterised samplers of Karras et al.
(Euler, Heun) are rewritten there: their x_ve = x / alpha, so the model needs no
separate input scaling pass and their trajectories are the diffusers ones, scaled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from ..ops import coeffs as C
from .schedules import (
    SchedulerConfig,
    float_timesteps,
    karras_sigmas,
    sigma_to_t,
    spaced_timesteps,
)


@dataclass
class Step:
    t: float                     # the timestep the model is called with
    row: np.ndarray              # float64 coefficients, NUM_FIXED + len(history)
    history: tuple = ()          # ("x", k): the sample step k started from; ("den", k): step k's denoised
    noise: bool = False
    write_denoised: bool = False
    alpha_bar: float = 0.0       # alpha_bar of the sample this step starts from (img2img entry)


@dataclass
class Plan:
    steps: list
    init_scale: float = 1.0      # unit noise -> starting sample
    t_dtype: torch.dtype = torch.int64
    clip_range: Optional[float] = None
    learned_variance: bool = False
    denoised_is_x0: bool = True  # whether Step.write_denoised writes x0 (else e.g. eps)
    name: str = ""
    # How classifier guidance (run_plan's cond_fn) enters a step: "mean" shifts the step's
    # mean by its variance times the gradient (Sohl-Dickstein et al. 2015; ancestral DDPM),
    # "score" shifts eps by -sqrt(1 - alpha_bar) times it (Song et al. 2021b); None: no meaning.
    classifier_guidance: Optional[str] = None
    # (ratio, max value) of dynamic thresholding (Imagen), in place of clip_range (thresholding.py)
    threshold: Optional[Tuple[float, float]] = None


def row(x0=(0.0, 0.0), out=(0.0, 0.0, 0.0), noise=0.0, den=(0.0, 0.0, 1.0), logvar=(0.0, 0.0), hist=()):
    """One coefficient row: x0 = x0[0]*x + x0[1]*p; out = out[0]*x + out[1]*p + out[2]*x0 + ..."""
    r = np.zeros(C.NUM_FIXED + len(hist), dtype=np.float64)
    r[C.X0_X], r[C.X0_P] = x0
    r[C.OUT_X], r[C.OUT_P], r[C.OUT_X0] = out
    r[C.OUT_NOISE] = noise
    r[C.DEN_X], r[C.DEN_P], r[C.DEN_X0] = den
    r[C.LOGVAR_MAX], r[C.LOGVAR_MIN] = logvar
    r[C.NUM_FIXED:] = hist
    return r


def vp_conversion(prediction_type: str, alpha_bar: float):
    """(x0 coefficients, eps coefficients) on (x, p) for a VP sample at alpha_bar."""
    a, s = np.sqrt(alpha_bar), np.sqrt(1.0 - alpha_bar)
    if prediction_type == "epsilon":
        return (1.0 / a, -s / a), (0.0, 1.0)
    if prediction_type == "v_prediction":
        return (a, -s), (s, a)
    return (0.0, 1.0), (1.0 / s, -a / s)


def ve_conversion(prediction_type: str, sigma: float):
    """x0 coefficients on (x_vp, p) at VE sigma, as diffusers' sigma-based schedulers convert."""
    alpha = 1.0 / np.sqrt(sigma**2 + 1.0)
    if prediction_type == "epsilon":
        return (1.0 / alpha, -sigma)
    if prediction_type == "v_prediction":
        return (alpha, -sigma * alpha)
    return (0.0, 1.0)


def _train_sigmas_f32(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Training sigmas as diffusers materialises them (float32 arithmetic)."""
    ac = torch.from_numpy(alphas_cumprod).float()
    return (((1 - ac) / ac) ** 0.5).numpy()


# --------------------------------------------------------------------------- DDIM / DDPM
#
# One construction each, over the alpha_bar a step starts from and the one it steps to:
# diffusers' DDIM/DDPM (ddim_plan, ddpm_plan below) and GLIDE's respaced process
# (respaced.py) differ only in which alpha_bars they pair and how they round them.


def check_eta(eta) -> float:
    """DDIM's eta: a finite number >= 0 (0 deterministic, 1 DDPM-like)."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.integer, np.floating)):
        raise TypeError(f"eta must be a number >= 0, got {eta!r}")
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    return float(eta)


def _x0_eps_coefficients(prediction_type: str, a: float):
    """(x0, eps) coefficients on (x, p) at alpha_bar a; epsilon as glide-text2im rounds them."""
    if prediction_type == "epsilon":
        return (math.sqrt(1.0 / a), -math.sqrt(1.0 / a - 1.0)), (0.0, 1.0)
    return vp_conversion(prediction_type, a)


def ddim_steps(timesteps, alpha_bars, prev_alpha_bars, *, eta: float, prediction_type: str = "epsilon",
               eps_from_x0: bool = False, noise_at_last: bool = True) -> list:
    """DDIM steps (Song et al. 2021, eq. 12) from alpha_bar a to a':
    x' = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z,  s = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a').

    eps_from_x0: eps re-derived from the (clipped) x0, as GLIDE and diffusers'
    use_clipped_model_output do. noise_at_last: the last step draws its (zero-scaled) noise
    too, as diffusers does; GLIDE's does not."""
    steps = []
    last = len(timesteps) - 1
    for k, (t, a, ap) in enumerate(zip(timesteps, alpha_bars, prev_alpha_bars)):
        std = eta * math.sqrt((1.0 - ap) / (1.0 - a)) * math.sqrt(1.0 - a / ap)
        direction = math.sqrt(max(1.0 - ap - std**2, 0.0))
        (x0x, x0p), (ex, ep) = _x0_eps_coefficients(prediction_type, a)
        if eps_from_x0:
            out = (direction / math.sqrt(1.0 - a), 0.0, math.sqrt(ap) - direction * math.sqrt(a) / math.sqrt(1.0 - a))
        else:
            out = (direction * ex, direction * ep, math.sqrt(ap))
        steps.append(Step(float(t), row((x0x, x0p), out, noise=std),
                          noise=eta > 0 and (noise_at_last or k < last), alpha_bar=a))
    return steps


def ddpm_steps(timesteps, alpha_bars, prev_alpha_bars, betas, variances, *, prediction_type: str = "epsilon",
               min_log_variances=None, noise_at_last: bool = True) -> list:
    """Ancestral DDPM steps (Ho et al. 2020) from alpha_bar a to a' (beta = 1 - a / a'):
    x' = (sqrt(1 - beta) (1 - a') x + sqrt(a') beta x0) / (1 - a) + std z, the mean of q(x' | x, x0) (eq. 7).

    variances: each step's fixed variance (std = its sqrt); min_log_variances instead: the
    learned range of Nichol & Dhariwal 2021 (eq. 15), log var between log beta and these.
    The last step adds noise only when noise_at_last and its t > 0 (diffusers); GLIDE's never does."""
    steps = []
    last = len(timesteps) - 1
    for k, (t, a, ap, beta) in enumerate(zip(timesteps, alpha_bars, prev_alpha_bars, betas)):
        x0_coeffs, _ = _x0_eps_coefficients(prediction_type, a)
        out = ((1.0 - ap) * math.sqrt(1.0 - beta) / (1.0 - a), 0.0, beta * math.sqrt(ap) / (1.0 - a))
        if min_log_variances is not None:
            std, logvar = 1.0, (math.log(beta), float(min_log_variances[k]))
        else:
            std, logvar = math.sqrt(max(float(variances[k]), 0.0)), (0.0, 0.0)
        steps.append(Step(float(t), row(x0_coeffs, out, noise=std, logvar=logvar),
                          noise=k < last or (noise_at_last and t > 0), alpha_bar=a))
    return steps


def _clip_range(cfg: SchedulerConfig) -> Optional[float]:
    # diffusers: `if thresholding: ... elif clip_sample: ...`; thresholding replaces clipping.
    return cfg.clip_sample_range if cfg.clip_sample and not cfg.thresholding else None


def _threshold(cfg: SchedulerConfig, name: str, supported: bool = True) -> Optional[Tuple[float, float]]:
    """Plan.threshold of a resolved config; a sampler whose diffusers class has none refuses it."""
    if not cfg.thresholding:
        return None
    if not supported:
        raise ValueError(f"the {name} sampler has no dynamic thresholding (its diffusers class lacks it)")
    return float(cfg.dynamic_thresholding_ratio), float(cfg.sample_max_value)


def ddim_plan(cfg: SchedulerConfig, num_steps: int, eta: float = 0.0,
              use_clipped_model_output: bool = False, start: int = 0) -> Plan:
    """DDIM (Song et al. 2021, eq. 12) on diffusers' timesteps, stepping t -> t - T // num_steps.

    In k-diffusion's form (x_ve = x / sqrt(a), sigma = sqrt((1 - a) / a)): x_ve += d * dt with
    d = (x_ve - x0) / sigma and dt = sigma_down - sigma, then + sigma_up z; eta = 0 gives
    sigma_down = sigma_next, sigma_up = 0 (DDIM is Euler's method in sigma)."""
    eta = check_eta(eta)
    cfg = cfg.resolved("ddim")
    sched = cfg.noise_schedule("ddim")
    ac, T = sched.alphas_cumprod, sched.num_train_timesteps
    final = 1.0 if cfg.set_alpha_to_one else ac[0]
    timesteps = spaced_timesteps(T, num_steps, cfg.timestep_spacing, cfg.steps_offset)[start:]
    prev = timesteps - T // num_steps
    steps = ddim_steps(timesteps, ac[timesteps], np.where(prev >= 0, ac[np.maximum(prev, 0)], final), eta=eta,
                       prediction_type=cfg.prediction_type, eps_from_x0=use_clipped_model_output)
    return Plan(steps, clip_range=_clip_range(cfg), name="ddim", classifier_guidance="score",
                threshold=_threshold(cfg, "ddim"))


def ddpm_plan(cfg: SchedulerConfig, num_steps: int, timesteps=None, start: int = 0) -> Plan:
    """Ancestral DDPM (Ho et al. 2020) over any timestep subset; fixed or learned-range variance.

    In k-diffusion's form (x_ve = x / sqrt(a), sigma = sqrt((1 - a) / a)): x_ve += d * dt with
    d = (x_ve - x0) / sigma, dt = sigma_down - sigma, sigma_down = sigma_next^2 / sigma, then
    + sigma_up z with sigma_up^2 = sigma_next^2 - sigma_down^2 (fixed_small: k-diffusion's
    euler_ancestral at eta = 1); fixed_large and learned_range widen sigma_up."""
    cfg = cfg.resolved("ddpm")
    sched = cfg.noise_schedule("ddpm")
    ac, T = sched.alphas_cumprod, sched.num_train_timesteps
    if timesteps is None:
        timesteps = spaced_timesteps(T, num_steps, cfg.timestep_spacing, cfg.steps_offset)
        if len(set(timesteps.tolist())) < len(timesteps):
            raise ValueError(f"num_steps={num_steps} repeats timesteps with timestep_spacing={cfg.timestep_spacing!r} "
                             f"on {T} training timesteps: take fewer steps or another spacing")
    timesteps = [int(t) for t in timesteps][start:]
    if any(b >= a for a, b in zip(timesteps, timesteps[1:])) or timesteps[0] >= T or timesteps[-1] < 0:
        raise ValueError(f"timesteps must be strictly descending within [0, {T}), got {timesteps}")
    a = ac[timesteps]
    ap = np.append(a[1:], 1.0)
    betas = 1.0 - a / ap
    posterior = np.maximum((1.0 - ap) / (1.0 - a) * betas, 1e-20)
    learned = cfg.variance_type == "learned_range"
    # fixed_small(_log) take the posterior variance; fixed_large beta (Ho et al. section 3.2)
    variances = betas if cfg.variance_type == "fixed_large" else posterior
    steps = ddpm_steps(timesteps, a, ap, betas, variances, prediction_type=cfg.prediction_type,
                       min_log_variances=np.log(posterior) if learned else None)
    return Plan(steps, clip_range=_clip_range(cfg), learned_variance=learned, name="ddpm",
                classifier_guidance="mean", threshold=_threshold(cfg, "ddpm"))


# --------------------------------------------------------------------------- PNDM

def pndm_plan(cfg: SchedulerConfig, num_steps: int, start: int = 0) -> Plan:
    """PNDM (Liu et al. 2022): Runge-Kutta warm-up (unless skip_prk_steps), then linear multistep.

    In k-diffusion's form (x_ve = x / sqrt(a), sigma = sqrt((1 - a) / a)): x_ve += d * dt with
    dt = sigma_prev - sigma and d = e', the pseudo-linear-multistep eps (55 e_0 - 59 e_1 +
    37 e_2 - 9 e_3) / 24 (fewer terms while the history fills; Runge-Kutta weights 1/6, 1/3,
    1/3, 1/6 in the warm-up): for an eps model d = (x_ve - x0) / sigma is eps itself.
    Mirrors diffusers' PNDMScheduler state machine step by step. The multistep history
    holds raw model outputs (each step's ``denoised`` output is its guided prediction).
    """
    cfg = cfg.resolved("pndm")
    _threshold(cfg, "pndm", supported=False)
    if cfg.prediction_type == "sample":
        raise ValueError("the pndm sampler supports epsilon and v_prediction models only")
    sched = cfg.noise_schedule("pndm")
    ac, T = sched.alphas_cumprod, sched.num_train_timesteps
    final = 1.0 if cfg.set_alpha_to_one else ac[0]
    ratio = T // num_steps
    if cfg.timestep_spacing == "linspace":
        base = np.linspace(0, T - 1, num_steps).round().astype(np.int64)
    else:
        base = spaced_timesteps(T, num_steps, cfg.timestep_spacing, cfg.steps_offset)[::-1]
    if cfg.skip_prk_steps:
        prk = np.array([], dtype=np.int64)
        plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
    else:
        prk = np.array(base[-4:]).repeat(2) + np.tile(np.array([0, ratio // 2]), 4)
        prk = prk[:-1].repeat(2)[1:-1][::-1]
        plms = base[:-3][::-1]
    if start:
        if not cfg.skip_prk_steps:
            raise ValueError("starting PNDM part-way (img2img) needs skip_prk_steps=True, as in diffusers")
        plms = plms[start:]

    def update(t, prev, sample_ref, weights):
        """_get_prev_sample on model output sum(w * p_ref), from sample `sample_ref`."""
        a, ap = ac[t], (ac[prev] if prev >= 0 else final)
        sample_coeff = np.sqrt(ap / a)
        denom = a * np.sqrt(1 - ap) + np.sqrt(a * (1 - a) * ap)
        k = -(ap - a) / denom
        if cfg.prediction_type == "v_prediction":  # eps = sqrt(a) * v + sqrt(1 - a) * sample
            sample_coeff, k = sample_coeff + k * np.sqrt(1 - a), k * np.sqrt(a)
        return sample_coeff, {ref: k * w for ref, w in weights.items()}

    steps = []
    ets = []             # refs of stored model outputs, oldest first (diffusers' self.ets)
    cur_sample = None    # ref of the stored sample (diffusers' self.cur_sample)
    rk_weights = {}
    for i, t in enumerate(prk):
        t = int(t)
        stage = i % 4
        prev = t - (0 if i % 2 else ratio // 2)
        t_eval = int(prk[i // 4 * 4])
        me = ("den", i)
        if stage == 0:
            rk_weights = {me: 1 / 6}
            ets.append(me)
            cur_sample = ("x", i)
            weights = {me: 1.0}
        elif stage in (1, 2):
            rk_weights[me] = 1 / 3
            weights = {me: 1.0}
        else:
            weights = {**rk_weights, me: 1 / 6}
        steps.append(_pndm_step(t, i, cur_sample, update(t_eval, prev, cur_sample, weights)))
    counter = len(prk)
    for t in plms:
        t = int(t)
        i = len(steps)
        me = ("den", i)
        prev = t - ratio
        t_eval = t
        if counter != 1:
            ets = ets[-3:] + [me]
        else:
            prev, t_eval = t, t + ratio
        if len(ets) == 1 and counter == 0:
            sample, weights = ("x", i), {me: 1.0}
            cur_sample = ("x", i)
        elif len(ets) == 1 and counter == 1:
            sample, weights = cur_sample, {me: 0.5, ets[-1]: 0.5}
        elif len(ets) == 2:
            sample, weights = ("x", i), {ets[-1]: 1.5, ets[-2]: -0.5}
        elif len(ets) == 3:
            sample, weights = ("x", i), {ets[-1]: 23 / 12, ets[-2]: -16 / 12, ets[-3]: 5 / 12}
        else:
            sample, weights = ("x", i), {ets[-1]: 55 / 24, ets[-2]: -59 / 24, ets[-3]: 37 / 24,
                                         ets[-4]: -9 / 24}
        steps.append(_pndm_step(t, i, sample, update(t_eval, prev, sample, weights)))
        counter += 1
    # Only outputs some later step reads need writing.
    read = {ref for s in steps for ref in s.history}
    for i, s in enumerate(steps):
        s.write_denoised = ("den", i) in read
        # x0 at the model's timestep, for previews only (OUT_X0 is 0).
        s.row[C.X0_X], s.row[C.X0_P] = vp_conversion(cfg.prediction_type, ac[int(s.t)])[0]
        s.alpha_bar = ac[int(s.t)]
    return Plan(steps, denoised_is_x0=False, name="pndm", classifier_guidance="score")


def _pndm_step(t, i, sample_ref, update) -> Step:
    sample_coeff, weights = update
    me, here = ("den", i), ("x", i)
    out_x = sample_coeff if sample_ref == here else 0.0
    out_p = weights.pop(me, 0.0)
    hist_refs, hist_w = [], []
    if sample_ref != here:
        hist_refs.append(sample_ref)
        hist_w.append(sample_coeff)
    for ref, w in weights.items():
        hist_refs.append(ref)
        hist_w.append(w)
    # den = p: the raw (guided) model output, PNDM's multistep history.
    r = row((0.0, 0.0), (out_x, out_p, 0.0), den=(0.0, 1.0, 0.0), hist=hist_w)
    return Step(float(t), r, tuple(hist_refs))


# --------------------------------------------------------------------------- sigma samplers

def _sigma_grid(cfg: SchedulerConfig, name: str, num_steps: int, karras: bool):
    """(float32 sigmas with the final 0 appended, float32 timesteps) as diffusers builds them."""
    sched = cfg.noise_schedule(name)
    T = sched.num_train_timesteps
    timesteps = float_timesteps(T, num_steps, cfg.timestep_spacing, cfg.steps_offset)
    train = _train_sigmas_f32(sched.alphas_cumprod)
    sigmas = np.interp(timesteps, np.arange(len(train)), train)
    if karras:
        lo = cfg.sigma_min if cfg.sigma_min is not None else sigmas[-1]
        hi = cfg.sigma_max if cfg.sigma_max is not None else sigmas[0]
        sigmas = karras_sigmas(lo, hi, num_steps)
        timesteps = sigma_to_t(sigmas, np.log(train))
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32).astype(np.float64)
    return sigmas, timesteps.astype(np.float32).astype(np.float64)


def _sigma_steps(sigmas, timesteps, start):
    """(index, timestep, sigma, next sigma, alpha, next alpha) from step `start` on; alpha = 1/sqrt(sigma^2+1)."""
    for i in range(start, len(timesteps)):
        s, sn = sigmas[i], sigmas[i + 1]
        yield i, timesteps[i], s, sn, 1 / np.sqrt(s**2 + 1), 1 / np.sqrt(sn**2 + 1)


def _init_scale(cfg, sigmas):
    """diffusers' init_noise_sigma, mapped into the VP state: x_vp = x_ve * alpha."""
    smax = sigmas.max()
    init = smax if cfg.timestep_spacing in ("linspace", "trailing") else np.sqrt(smax**2 + 1)
    return float(init / np.sqrt(sigmas[0] ** 2 + 1))


def euler_plan(cfg: SchedulerConfig, num_steps: int, ancestral: bool = False, start: int = 0) -> Plan:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 1 without churn),
    or its ancestral variant (k-diffusion's sample_euler_ancestral).

    x_ve += d * dt with d = (x_ve - x0) / sigma and dt = sigma_next - sigma; ancestral:
    dt = sigma_down - sigma, then + sigma_up z (sigma_up = sqrt(sigma_next^2 (sigma^2 -
    sigma_next^2) / sigma^2), sigma_down = sqrt(sigma_next^2 - sigma_up^2)). Held as x = x_ve * alpha."""
    name = "euler_a" if ancestral else "euler"
    cfg = cfg.resolved(name)
    _threshold(cfg, name, supported=False)
    sigmas, timesteps = _sigma_grid(cfg, name, num_steps, karras=bool(cfg.use_karras_sigmas) and not ancestral)
    steps = []
    for i, t, s, sn, alpha, alpha_n in _sigma_steps(sigmas, timesteps, start):
        up = np.sqrt(sn**2 * (s**2 - sn**2) / s**2) if ancestral else 0.0
        down = np.sqrt(sn**2 - up**2) if ancestral else sn
        # x_ve' = x_ve + (x_ve - x0) / s * (down - s); back to VP with alpha_n.
        ratio = down / s
        out = (alpha_n * ratio / alpha, 0.0, alpha_n * (1 - ratio))
        steps.append(Step(float(t), row(ve_conversion(cfg.prediction_type, s), out, noise=alpha_n * up),
                          noise=ancestral, alpha_bar=alpha**2))
    return Plan(steps, init_scale=_init_scale(cfg, sigmas), t_dtype=torch.float32, name=name,
                classifier_guidance="score")


def heun_plan(cfg: SchedulerConfig, num_steps: int, start: int = 0) -> Plan:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1), Euler on the last step to sigma 0.

    x_ve += (d + d') / 2 * dt with d = (x_ve - x0) / sigma, dt = sigma_next - sigma, and d' the
    same at the Euler point (x_ve + d * dt, sigma_next): two steps here, the second reading
    the first's start sample and x0 as history. Held as x = x_ve * alpha."""
    cfg = cfg.resolved("heun")
    _threshold(cfg, "heun", supported=False)
    sigmas, timesteps = _sigma_grid(cfg, "heun", num_steps, karras=bool(cfg.use_karras_sigmas))
    pred = cfg.prediction_type
    steps = []
    for i, t, s, sn, alpha, alpha_n in _sigma_steps(sigmas, timesteps, start):
        dt = sn - s
        # First order: Euler to sn, remembering the start sample and x0 for the correction.
        first = len(steps)
        steps.append(Step(float(t), row(ve_conversion(pred, s), (alpha_n * (sn / s) / alpha, 0.0,
                                                                  alpha_n * (1 - sn / s))),
                          alpha_bar=alpha**2))
        if sn == 0:
            break
        # Second order at sn: x_ve'' = x_ve + dt / 2 * (d(x_ve, s) + d(x_ve', sn)), d = (x - x0) / sigma.
        steps[first].write_denoised = True
        corr = row(ve_conversion(pred, sn),
                   (dt / (2 * sn), 0.0, -alpha_n * dt / (2 * sn)),
                   hist=(alpha_n * (1 + dt / (2 * s)) / alpha, -alpha_n * dt / (2 * s)))
        steps.append(Step(float(timesteps[i + 1]), corr, (("x", first), ("den", first)), alpha_bar=alpha_n**2))
    return Plan(steps, init_scale=_init_scale(cfg, sigmas), t_dtype=torch.float32,
                clip_range=_clip_range(cfg), name="heun", classifier_guidance="score")


def dpmpp_2m_plan(cfg: SchedulerConfig, num_steps: int, karras: Optional[bool] = None, start: int = 0) -> Plan:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, midpoint), diffusers' order and final-step rules.

    x_ve += d * dt with dt = sigma_next - sigma and d = (x_ve - D) / sigma, where D =
    (1 + 1 / (2 r)) x0 - 1 / (2 r) x0_prev, r = h_prev / h, h = log(sigma / sigma_next) (the
    multistep x0; D = x0 on first-order steps): exactly the paper's
    x' = (sigma_next / sigma) x - (exp(-h) - 1) D. Held as x = x_ve * alpha."""
    cfg = cfg.resolved("dpmpp_2m")
    karras = bool(cfg.use_karras_sigmas) if karras is None else karras
    sched = cfg.noise_schedule("dpmpp_2m")
    T = sched.num_train_timesteps
    ac = sched.alphas_cumprod
    if cfg.timestep_spacing == "linspace":
        timesteps = np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    elif cfg.timestep_spacing == "leading":
        ratio = T // (num_steps + 1)
        timesteps = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
    else:
        timesteps = np.arange(T, 0, -T / num_steps).round().astype(np.int64) - 1
    train = _train_sigmas_f32(ac)
    if karras:
        sigmas = karras_sigmas(train[0], train[-1], num_steps)
        timesteps = sigma_to_t(sigmas, np.log(train))
        if cfg.beta_schedule != "squaredcos_cap_v2":
            timesteps = timesteps.round()
        timesteps = timesteps.astype(np.int64)
    else:
        sigmas = np.interp(timesteps, np.arange(len(train)), train)
    last = np.sqrt((1 - ac[0]) / ac[0]) if cfg.final_sigmas_type == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32).astype(np.float64)
    n = len(timesteps)
    alpha = 1 / np.sqrt(sigmas**2 + 1)   # VP alpha_t per grid point
    sig_vp = sigmas * alpha              # VP sigma_t
    steps = []
    for i, t in enumerate(timesteps):
        if i < start:
            continue
        x0_coef = ve_conversion_dpm(cfg.prediction_type, alpha[i], sig_vp[i])
        # exp(-h) with lambda = log(alpha / sigma_vp) = -log(sigma_ve): a ratio of VE sigmas.
        e = sigmas[i + 1] / sigmas[i]
        lower_final = i == n - 1 and (
            (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero")
        first_order = i == start or lower_final or cfg.solver_order == 1
        base = alpha[i + 1] * (1 - e)    # -alpha_t (exp(-h) - 1)
        if first_order:
            r = row(x0_coef, (sig_vp[i + 1] / sig_vp[i], 0.0, base))
            steps.append(Step(float(t), r, write_denoised=True, alpha_bar=alpha[i] ** 2))
        else:
            h = np.log(sigmas[i] / sigmas[i + 1])
            h0 = np.log(sigmas[i - 1] / sigmas[i])
            r0 = h0 / h
            r = row(x0_coef, (sig_vp[i + 1] / sig_vp[i], 0.0, base * (1 + 0.5 / r0)), hist=(-0.5 * base / r0,))
            steps.append(Step(float(t), r, (("den", i - 1 - start),), write_denoised=True, alpha_bar=alpha[i] ** 2))
    return Plan(steps, name="dpmpp_2m_karras" if karras else "dpmpp_2m", classifier_guidance="score",
                threshold=_threshold(cfg, "dpmpp_2m"))


def ve_conversion_dpm(prediction_type: str, alpha_t: float, sigma_t: float):
    """x0 coefficients on (x, p) for DPM-Solver++'s data prediction at (alpha_t, sigma_t)."""
    if prediction_type == "epsilon":
        return (1 / alpha_t, -sigma_t / alpha_t)
    if prediction_type == "v_prediction":
        return (alpha_t, -sigma_t)
    return (0.0, 1.0)
