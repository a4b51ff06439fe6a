"""Chen et al. Sec. 4 (App. A) simulated on a Gaussian mixture, run as an evaluate.py command:

    python evaluate.py gmm [--dims 4,16,64] [--gammas 0.05,0.1,0.2] [--n-k 100]

Per class, a linear x0-denoiser W_t x_t + v_t c is fit by least squares to n_k draws of N(mu_k, I) at every time of
an OU process, with the condition clean (c = 1) or corrupted (c = 1 + gamma xi); the DDIM ODE from N(0, I) carries
the Gaussian exactly through its affine steps. Measured: the entropy gain (Thm 1) and the W2^2 gain towards the truth
(Thm 2) over clean training, beside two predictions: the fit's closed form and Lemma 4 as the paper writes it
(docs/measures.md). Writes gmm.json and gmm.png.
"""
import argparse

import numpy as np

from evaluate import frechet_distance
from ext.plots import markdown, plot
from plumbing import Interval, save_json


# The squared 2-Wasserstein distance between N(m1, c1) and N(m2, c2) (Givens and Shortt 1984) is the Frechet
# distance of FID: one function for both.
w2_gaussian = frechet_distance


def gaussian_entropy(c):
    return 0.5 * np.linalg.slogdet(2 * np.pi * np.e * c)[1]


def fit_denoiser(x0, a, gamma):
    """Least squares x0 ~ W x_t + v c over one class's n_k images x0 at each OU time's a = e^-t, with the noise
    integrated out (training draws fresh noise every step): x_t = a x0 + sqrt(1 - a^2) eps, c = 1 + gamma xi is the
    class's own one-hot coordinate, corrupted as in Sec. 4 (gamma 0: clean). Solves the normal equations of
    E|x0 - W x_t - v c|^2 at every time at once: -> (W [T, d, d], v [T, d])."""
    n, d = x0.shape
    m, second, a = x0.mean(0), x0.T @ x0 / n, a[:, None, None]
    gram = np.zeros((len(a), d + 1, d + 1))
    gram[:, :d, :d] = a * a * second + (1 - a * a) * np.eye(d)
    gram[:, :d, d] = gram[:, d, :d] = a[:, 0] * m
    gram[:, d, d] = 1 + gamma ** 2
    rhs = np.concatenate([a * second, np.broadcast_to(m, (len(a), 1, d))], 1)
    b = np.linalg.solve(gram, rhs)  # [T, d + 1, d]: x0_hat^T = [x_t^T, c] b
    return b[:, :d].transpose(0, 2, 1), b[:, d]


def generated_gaussian(w, v, times):
    """What the DDIM ODE (eta 0) of the OU process makes from N(0, I) with the fitted denoisers (W, v at each of
    `times`, falling) and the clean condition c = 1. Each step is affine, so the Gaussian is carried exactly:
    -> (mean, covariance)."""
    d = v.shape[1]
    mean, cov = np.zeros(d), np.eye(d)
    for wt, vt, t, t_next in zip(w, v, times, list(times[1:]) + [0.0]):
        a, a_next = np.exp(-t), np.exp(-t_next)
        s, s_next = np.sqrt(1 - a * a), np.sqrt(1 - a_next * a_next)
        k = a_next - s_next * a / s  # x_next = a_next x0_hat + s_next eps_hat, eps_hat = (x - a x0_hat) / s
        step = k * wt + (s_next / s) * np.eye(d)
        mean, cov = step @ mean + k * vt, step @ cov @ step.T
    return mean, cov


def gmm_forms(m, s, gamma):
    """Closed forms of the corruptly trained model's class Gaussian from the class's empirical mean m and
    covariance s: (the least-squares fit's exact one, App. A Lemma 4 as the paper writes it). The fit's: the noise
    on c puts a ridge gamma^2 |v|^2 on v, so the model is the posterior mean of N(m/(1+g^2), s + g^2/(1+g^2) m m^T);
    Lemma 4 has |m|^2 I where the fit has m m^T: equal along m, d times the fit's in total."""
    lam, mean = gamma ** 2 / (1 + gamma ** 2), m / (1 + gamma ** 2)
    return (mean, s + lam * np.outer(m, m)), (mean, s + lam * (m @ m) * np.eye(len(m)))


def gmm_class(x0, mu, gammas, times):
    """One class's gains over clean training at each gamma: entropy gain (Thm 1) and W2^2 gain towards the truth
    N(mu, I) (Thm 2), measured on the simulated model and from the two closed forms. -> {gamma: 6 gains}."""
    fit = lambda g: generated_gaussian(*fit_denoiser(x0, np.exp(-times), g), times)
    truth, clean = (mu, np.eye(len(mu))), fit(0.0)
    m, s = x0.mean(0), np.cov(x0.T, bias=True)
    gains = lambda q, ref: (gaussian_entropy(q[1]) - gaussian_entropy(ref[1]), w2_gaussian(*truth, *ref) -
                            w2_gaussian(*truth, *q))
    out = {}
    for g in gammas:
        exact, lemma = gmm_forms(m, s, g)
        out[g] = gains(fit(g), clean) + gains(exact, (m, s)) + gains(lemma, (m, s))
    return out


def cmd_gmm(a):
    """Chen et al. Sec. 4 simulated: per class, a linear denoiser W_t x_t + v_t c fit by least squares on n_k
    draws of N(mu_k, I) (mu_k ~ N(0, I_d)) with and without gamma xi on the condition, sampled by the DDIM ODE;
    entropy and W2 gains against clean training, measured and predicted, averaged over classes and trials."""
    rng, times = np.random.default_rng(a.seed), np.geomspace(a.t_max, 1e-3, a.steps)
    gammas, rows = [g for g in a.gammas if g > 0], []
    if not gammas:
        raise ValueError("--gammas needs a level above 0: 0 is the clean run every gain is measured against")
    for d in a.dims:
        gains = {g: [] for g in gammas}
        for _ in range(a.trials):
            for mu in rng.standard_normal((a.classes, d)):
                res = gmm_class(mu + rng.standard_normal((a.n_k, d)), mu, gammas, times)
                for g in gammas:
                    gains[g].append(res[g])
        for g in gammas:
            v = np.mean(gains[g], 0)
            rows.append(dict(d=d, n_k=a.n_k, gamma=g, entropy_gain=v[0], w2_gain=v[1], entropy_gain_fit=v[2],
                             w2_gain_fit=v[3], entropy_gain_lemma4=v[4], w2_gain_lemma4=v[5]))
    cols = [("d", lambda r: str(r["d"])), ("n_k", lambda r: str(r["n_k"])), ("gamma", lambda r: f"{r['gamma']:g}")]
    cols += [(k.replace("_", " "), lambda r, k=k: f"{r[k]:.4g}") for k in rows[0] if k not in ("d", "n_k", "gamma")]
    table = markdown(cols, rows)
    out = a.out or "gmm"
    plot(rows, out + ".png", "gamma", "gamma", [("entropy_gain", "entropy gain (measured)", "nats"),
         ("w2_gain", "W2^2 gain (measured)", "W2^2"), ("entropy_gain_fit", "entropy gain (fit's closed form)", "nats"),
         ("w2_gain_fit", "W2^2 gain (fit's closed form)", "W2^2")], lambda r: f"d {r['d']}, n_k {r['n_k']}")
    for d in a.dims:  # Thm 2 holds for gamma = O(1/sqrt(n_k)): where does the W2 gain turn into a loss?
        for key, what in (("w2_gain", "measured"), ("w2_gain_fit", "fit's closed form")):
            loss = [r["gamma"] for r in rows if r["d"] == d and r[key] < 0]
            table += f"d {d}: W2 gain ({what}) " + (f"is a loss from gamma {loss[0]:g} on\n" if loss else
                                                     "stays a gain over the gammas run\n")
    save_json(out + ".json", dict(rows=rows, args={k: v for k, v in vars(a).items() if k != "cmd"}))
    print(table + f"wrote {out}.json and {out}.png")
    return rows


EVALUATE = dict(gmm=cmd_gmm)  # evaluate.py's command


def parser(command="gmm"):
    g = argparse.ArgumentParser(prog="evaluate.py gmm", description=cmd_gmm.__doc__)
    count = Interval(int, "[1, inf)")
    g.add_argument("--dims", type=Interval(int, "[1, 512]", many=True), default=[4, 16, 64], help="data dimensions d")
    g.add_argument("--n-k", type=Interval(int, "[2, inf)"), default=100, help="training images per class")
    g.add_argument("--gammas", type=Interval(float, "[0, inf)", many=True), default=[0.05, 0.1, 0.15, 0.2, 0.3, 0.5],
                   help="condition noise levels (0 is the clean run every gain is measured against)")
    g.add_argument("--classes", type=count, default=2)
    g.add_argument("--trials", type=count, default=4, help="training sets drawn per d (Thm 2 is an expectation)")
    g.add_argument("--steps", type=Interval(int, "[2, inf)"), default=400, help="DDIM steps (and fitted times)")
    g.add_argument("--t-max", type=Interval(float, "(0, inf)"), default=8.0, help="OU time the ODE starts from")
    g.add_argument("--seed", type=Interval(int, "[0, inf)"), default=0)
    g.add_argument("--out", help="writes OUT.json and OUT.png (default: gmm.json, gmm.png here)")
    return g
