"""Independent numpy/scipy implementations of the linear alignment metrics and RSA, written from their
definitions (netrep's LinearMetric, Raghu et al.'s SVCCA, Morcos et al.'s PWCCA, rsatoolbox's RDMs),
not from repkern.reference: the oracles of tests/test_shape.py, test_cca.py, test_rsa.py and
test_streaming_alignment.py."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.spatial.distance
import scipy.stats


# ---- netrep's LinearMetric ------------------------------------------------------------------------------


def _pad(x, width):
    return np.pad(x, ((0, 0), (0, width - x.shape[1])))


def _whiten_eigh(xc, alpha):
    """netrep.utils.whiten(X, alpha, preserve_variance=True) as written: eigh of XᵀX."""
    if alpha > 1 - 1e-7:
        return xc
    lam, v = np.linalg.eigh(xc.T @ xc)
    lam = np.maximum(lam, 1e-7)
    d = alpha + (1 - alpha) * lam ** (-0.5)
    new_var = np.sum(alpha**2 * lam + 2 * alpha * (1 - alpha) * lam**0.5 + (1 - alpha) ** 2)
    d *= np.sqrt(np.sum(lam) / new_var)
    return xc @ ((v * d[None, :]) @ v.T)


def _whiten_svd(xc, alpha):
    """The same map with XᵀX's eigenvectors from the SVD of X (its eigenvalues: the squared singular
    values, exact zeros beyond min(n, p)): accurate when X is rank-deficient (n <= d)."""
    if alpha > 1 - 1e-7:
        return xc
    n, p = xc.shape
    u, s, vt = np.linalg.svd(xc, full_matrices=True)
    lam_true = np.zeros(p)
    lam_true[: s.size] = s**2
    lam_true[lam_true < 1e-20 * lam_true.max()] = 0.0  # rounding-level directions: no variance
    lam = np.maximum(lam_true, 1e-7)
    d = alpha + (1 - alpha) * lam ** (-0.5)
    new_var = np.sum(alpha**2 * lam + 2 * alpha * (1 - alpha) * lam**0.5 + (1 - alpha) ** 2)
    d *= np.sqrt(np.sum(lam) / new_var)
    # X Z = U S Vᵀ V diag(d) Vᵀ = U diag(s d) Vᵀ, with s = sqrt(λ_true)
    return (u[:, : s.size] * (np.sqrt(lam_true[: s.size]) * d[: s.size])) @ vt[: s.size]


def netrep_linear_metric(x, y, alpha=1.0, score="angular", whiten="eigh"):
    """LinearMetric(alpha, center_columns=True, zero_pad=True, score_method=score).fit(x, y).score(x, y)."""
    width = max(x.shape[1], y.shape[1])
    x, y = _pad(np.asarray(x, np.float64), width), _pad(np.asarray(y, np.float64), width)
    w = _whiten_eigh if whiten == "eigh" else _whiten_svd
    xw, yw = w(x - x.mean(0), alpha), w(y - y.mean(0), alpha)
    u, _, vt = np.linalg.svd(xw.T @ yw)
    tx, ty = xw @ u, yw @ vt.T
    if score == "euclidean":
        return np.linalg.norm(tx - ty, ord="fro")
    corr = np.dot(tx.ravel(), ty.ravel()) / (np.linalg.norm(tx.ravel()) * np.linalg.norm(ty.ravel()))
    return np.arccos(np.clip(corr, -1.0, 1.0))


# ---- CCA family ----------------------------------------------------------------------------------------------


def orth(x, rtol=1e-10):
    """Orthonormal basis of the column space of the centered x (singular values above rtol·s_max)."""
    xc = np.asarray(x, np.float64)
    xc = xc - xc.mean(0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    return u[:, s > rtol * s[0]]


def cca_subspace_angles(x, y):
    """Canonical correlations as cosines of scipy's principal angles between the centered column spaces."""
    xc, yc = (np.asarray(t, np.float64) - np.asarray(t, np.float64).mean(0) for t in (x, y))
    return np.sort(np.cos(scipy.linalg.subspace_angles(xc, yc)))[::-1]


def cca_covariance(x, y):
    """Canonical correlations from covariance matrices: singular values of Σxx^-½ Σxy Σyy^-½ (np.cov),
    full-rank inputs; plus x's canonical weight vectors a_i (columns) with unit-variance variates."""
    dx = x.shape[1]
    cov = np.cov(np.asarray(x, np.float64), np.asarray(y, np.float64), rowvar=False)
    sxx, sxy, syy = cov[:dx, :dx], cov[:dx, dx:], cov[dx:, dx:]

    def inv_sqrt(s):
        w, v = np.linalg.eigh(s)
        return (v / np.sqrt(w)) @ v.T

    ix, iy = inv_sqrt(sxx), inv_sqrt(syy)
    u, rho, _ = np.linalg.svd(ix @ sxy @ iy)
    k = min(x.shape[1], y.shape[1])
    return rho[:k], ix @ u[:, :k]


def svcca_numpy(x, y, dims=None, keep=0.99):
    """Raghu et al.: center, keep the top SVD directions (dims, else the fewest reaching keep of Σs²),
    the reduced data U_k S_k, then the mean of all canonical correlations."""
    reduced = []
    for t, k in zip((x, y), (None, None) if dims is None else dims):
        tc = np.asarray(t, np.float64) - np.asarray(t, np.float64).mean(0)
        u, s, _ = np.linalg.svd(tc, full_matrices=False)
        if k is None:
            explained = np.cumsum(s**2) / np.sum(s**2)
            k = int(np.searchsorted(explained, keep) + 1)  # fewest with explained >= keep
            k = min(k, s.size)
        reduced.append(u[:, :k] * s[:k])
    rho, _ = cca_covariance(*reduced)
    return rho.mean()


def pwcca_numpy(x, y):
    """Morcos et al.: weights α_i = Σ_j |⟨h_i, x_j⟩| from x's canonical variates h_i (unit norm) and its
    centered units x_j; Σ α_i ρ_i / Σ α_i. Full-rank inputs."""
    xc = np.asarray(x, np.float64) - np.asarray(x, np.float64).mean(0)
    rho, a = cca_covariance(x, y)
    h = xc @ a
    h /= np.linalg.norm(h, axis=0)
    weights = np.abs(xc.T @ h).sum(0)
    return np.sum(weights * rho) / np.sum(weights)


# ---- RSA ----------------------------------------------------------------------------------------------------


def rdm_scipy(x, metric):
    """rsatoolbox's calc_rdm conventions through scipy's pdist (same condensed order)."""
    x = np.asarray(x, np.float64)
    if metric == "correlation":
        return scipy.spatial.distance.pdist(x, "correlation")
    return scipy.spatial.distance.pdist(x, "sqeuclidean") / x.shape[1]


def rsa_scipy(x, y, rdm="correlation", compare="spearman"):
    a, b = rdm_scipy(x, rdm), rdm_scipy(y, rdm)
    if compare == "spearman":
        return scipy.stats.spearmanr(a, b).statistic
    return scipy.stats.pearsonr(a, b).statistic
