"""Draws the physical galaxy population of a flux-limited (SDSS MGS-like) survey, one galaxy per index.

(z, M_r) come from a Schechter luminosity function with luminosity evolution in comoving volume;
each galaxy gets a kcorrect template mixture (prototype given M_r) plus per-band colour residuals fitted by
calibrate.py, then the Petrosian r <= r_lim selection is applied with the galaxy's own k-correction, profile
deficit and Petrosian scatter (rejection, so colour-dependent selection is exact). Each galaxy uses only its own generator seeded from (seed, index), so any
partition of the indices over workers gives identical galaxies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial

import numpy as np

from photoz_hpc.errors import ConfigError
from photoz_hpc.sim import cosmology, sky
from photoz_hpc.sim.params import load_calibration
from photoz_hpc.sim.seds import AB_OFFSET, TemplateGrid, apparent_mags, k_terms, k_terms_through, template_grid

M_PIVOT = -20.5
#: lower bound of the blue/red weight of ``type_evolution``; its upper bound is ``sed["evolution_cap"]``, or
#: this default for calibrations that do not store it (version 4 and before).
EVOLUTION_FLOOR, EVOLUTION_CAP_DEFAULT = 0.1, 10.0
_CANDIDATES = 8
# Shen et al. (2003) r-band size-luminosity relations (R50 in kpc, h=0.7), Table 1.
_SHEN_LATE = dict(alpha=0.21, beta=0.53, gamma=-1.31, m0=-20.52, s1=0.48, s2=0.25)
_SHEN_EARLY = dict(a=0.60, b=-4.63, s1=0.45, s2=0.27)
# Per-band Moffat PSF: median SDSS seeing (FWHM arcsec, u..z) and per-galaxy log-normal scatter.
PSF_FWHM = np.array([1.55, 1.45, 1.35, 1.30, 1.30])
PSF_BETA = 3.0
SEEING_SIGMA_LN = 0.15
SKY_SIGMA_MAG = 0.15
#: Petrosian-minus-model r defaults (Blanton et al. 2001: a Petrosian aperture misses ~18% of a de Vaucouleurs
#: and ~1% of an exponential profile); calibration.json["selection"] may refine them (petro_* keys).
PETRO_DEFAULTS = {"petro_frac_dev": 0.82, "petro_frac_exp": 0.99, "petro_offset": 0.0, "petro_sigma": 0.0}


def _rng(seed: int, index: int) -> np.random.Generator:
    """Per-galaxy generator: Philox keyed by SeedSequence((seed, index)); independent of chunking."""
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([int(seed), int(index)])))


@dataclass(frozen=True)
class SurveyModel:
    """Precomputed sampling tables; built once per process from the calibration."""

    grid: TemplateGrid
    lf: dict
    sel: dict
    sed: dict
    z_tab: np.ndarray
    zcdf_tab: np.ndarray
    m_faint_tab: np.ndarray
    x_tab: np.ndarray
    xcdf_tab: np.ndarray

    def m_star(self, z: np.ndarray) -> np.ndarray:
        """Evolving characteristic magnitude M*(z) = M*(0.1) - Q (z - 0.1) (Blanton et al. 2003)."""
        return self.lf["M_star"] - self.lf["Q"] * (np.asarray(z) - 0.1)


def _schechter_mag(x: np.ndarray, alpha: float) -> np.ndarray:
    """Schechter phi(M) up to normalisation, in x = M - M*."""
    t = 10 ** (-0.4 * x)
    return t ** (alpha + 1) * np.exp(-t)


@lru_cache(maxsize=4)
def survey_model(path: str | None = None, lf_override: tuple | None = None,
                 sel_override: tuple | None = None) -> SurveyModel:
    """Sampling tables: n(z) for the joint Schechter x volume density inside the bluest-possible limit.

    ``lf_override`` / ``sel_override``: ((key, value), ...) replacing calibration values (used by calibrate.py).
    """
    cal = load_calibration(path)
    grid, sed = template_grid(path), cal["sed_model"]
    lf = dict(cal["lf"])
    lf.update(dict(lf_override or ()))
    sel = {**PETRO_DEFAULTS, **cal["selection"], **dict(sel_override or ())}
    x_tab = np.linspace(-6.0, 12.0, 3601)
    pdf = _schechter_mag(x_tab, lf["alpha"])
    xcdf = np.concatenate([[0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]) * np.diff(x_tab))])
    z_tab = np.linspace(sel["z_min"], sel["z_max"], 801)
    # Brightest k-term any template mixture reaches (extreme templates bound every mixture).
    k_min = np.min(-2.5 * np.log10(grid.at(z_tab)[:, :, 2] / grid.rest_r[None, :]), axis=1)
    # Model r can exceed r_lim by the Petrosian scatter; leave 4 sigma of room (plus 0.05 mag) in the draw.
    margin = 0.05 + max(0.0, 4 * sel["petro_sigma"] - sel["petro_offset"])
    m_faint = np.minimum(sel["r_lim"] - cosmology.distance_modulus(z_tab) - k_min + margin, lf["M_faint"])
    m_star = lf["M_star"] - lf["Q"] * (z_tab - 0.1)
    lo = np.interp(lf["M_bright"] - m_star, x_tab, xcdf)
    hi = np.interp(m_faint - m_star, x_tab, xcdf)
    dens = cosmology.dvdz(z_tab) * np.maximum(hi - lo, 0) * 10 ** (0.4 * lf.get("P", 0.0) * (z_tab - 0.1))
    zcdf = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(z_tab))])
    return SurveyModel(grid, lf, sel, sed, z_tab, zcdf / zcdf[-1], m_faint, x_tab, xcdf)


def type_evolution(abs_r: np.ndarray, z: np.ndarray, lf: dict, dq_blue: float,
                   cap: float = EVOLUTION_CAP_DEFAULT) -> np.ndarray:
    """Weight of blue relative to red galaxies at (M_r, z) when blue ones brighten faster by ``dq_blue`` mag per z.

    Both types share the Schechter shape and M*(z) of ``lf``; the blue LF is shifted by dq_blue (z - 0.1) mag,
    so at fixed M_r the blue/red ratio changes by S(x + dq (z - 0.1)) / S(x), x = M_r - M*(z): 1 at z = 0.1
    and at the faint end (flat LF), larger for luminous galaxies at higher z (Loveday et al. 2012: blue
    galaxies evolve faster). Clipped to [0.1, cap]: the Schechter ratio grows without bound for luminous
    galaxies at high z (exp of the shifted luminosity), which would make every z > 0.25 galaxy blue.
    """
    x = np.asarray(abs_r) - (lf["M_star"] - lf["Q"] * (np.asarray(z) - 0.1))
    ratio = _schechter_mag(x + dq_blue * (np.asarray(z) - 0.1), lf["alpha"]) / _schechter_mag(x, lf["alpha"])
    return np.clip(ratio, EVOLUTION_FLOOR, cap)


def sed_weights(abs_r: np.ndarray, u_pick: np.ndarray, normals: np.ndarray, sed: dict,
                z: np.ndarray | None = None, lf: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Template light fractions w (n, 5), red flag and prototype index: a prototype drawn from p(prototype | M_r).

    With ``z`` and ``lf`` and a calibrated ``sed["dq_blue"]``, the blue part of each prototype (1 - its red
    fraction) is reweighted by ``type_evolution`` (type-dependent luminosity evolution; the table is for z ~ 0.1).
    """
    mbin = np.searchsorted(np.asarray(sed["m_edges"]), abs_r)
    p = np.asarray(sed["p_proto_given_m"])[mbin]
    if z is not None and lf is not None and sed.get("dq_blue", 0.0):
        red_frac = np.asarray(sed["prototype_red"])
        boost = type_evolution(abs_r, z, lf, sed["dq_blue"], sed.get("evolution_cap", EVOLUTION_CAP_DEFAULT))
        p = p * (red_frac[None, :] + (1 - red_frac[None, :]) * boost[:, None])
    cdf = np.cumsum(p, axis=1)
    k = np.minimum((cdf < u_pick[:, None] * cdf[:, -1:]).sum(axis=1), cdf.shape[1] - 1)
    w = np.asarray(sed["prototypes"])[k] + normals * np.asarray(sed["prototype_sd"])[k]
    w = np.clip(w, 0.0, None)
    return w / w.sum(axis=1, keepdims=True), np.asarray(sed["prototype_red"])[k] > 0.5, k


def colour_residuals(k: np.ndarray, z: np.ndarray, normals: np.ndarray, sed: dict) -> np.ndarray:
    """Per-band magnitude offsets (n, 5), zero in r: what the 5-template NNLS fits miss of real colours.

    Per prototype, calibrate.py stores the mean (real - fit) colour residual, linear in z inside the z range of
    the prototype's galaxies (constant outside), and its intrinsic scatter (measurement noise removed); e.g. the
    kcorrect templates make red galaxies ~0.1 mag too blue in u-g.
    """
    if "resid_a" not in sed:
        return np.zeros((len(k), 5))
    a, b, sd, zr = (np.asarray(sed[key])[k] for key in ("resid_a", "resid_b", "resid_sd", "resid_z_range"))
    zc = np.clip(np.asarray(z), zr[:, 0], zr[:, 1])  # trend not extrapolated beyond the prototype's data
    return a + b * (zc[:, None] - 0.1) + normals * sd


def _draw_population(rng: np.random.Generator, base: SurveyModel, nz: SurveyModel | BandModel) -> dict:
    """The survey-independent part of _CANDIDATES candidate draws: z from ``nz``'s n(z) tables, M_r, SED
    (``proto``: prototype index), the colour-residual normals and B/T, in the one draw order every survey shares.

    The residual normals are drawn before B/T but applied by the caller (SDSS or another survey's filters).
    """
    n = _CANDIDATES
    z = np.interp(rng.random(n), nz.zcdf_tab, nz.z_tab)
    ms = base.m_star(z)
    lo = np.interp(base.lf["M_bright"] - ms, base.x_tab, base.xcdf_tab)
    hi = np.interp(np.interp(z, nz.z_tab, nz.m_faint_tab) - ms, base.x_tab, base.xcdf_tab)
    abs_r = ms + np.interp(lo + rng.random(n) * (hi - lo), base.xcdf_tab, base.x_tab)
    w, red, proto = sed_weights(abs_r, rng.random(n), rng.standard_normal((n, 5)), base.sed, z, base.lf)
    resid_normals = rng.standard_normal((n, 5))
    bt = np.clip(np.where(red, rng.normal(0.65, 0.15, n), rng.normal(0.15, 0.12, n)), 0.0, 0.95)
    return dict(z=z, abs_r=abs_r, w=w, red=red, proto=proto, resid_normals=resid_normals, bt=bt)


def _draw_candidates(rng: np.random.Generator, model: SurveyModel) -> dict:
    """_CANDIDATES independent (z, M, SED) draws with SDSS magnitudes; ``selected``: passing the MGS limits."""
    cand = _draw_population(rng, model, model)
    z = cand["z"]
    dcol = colour_residuals(cand["proto"], z, cand.pop("resid_normals"), model.sed)
    mags = apparent_mags(cand["abs_r"], cand["w"], z, model.grid, cosmology.distance_modulus(z)) + dcol
    # MGS selects on Petrosian r, which misses ~18% of a de Vaucouleurs and ~1% of an exponential
    # profile's light (Blanton et al. 2001); model magnitudes capture the total. petro_offset/petro_sigma:
    # calibrated mean shift and scatter of Petrosian-minus-model r (profile mismatch, target-vs-final photometry).
    sel, bt = model.sel, cand["bt"]
    frac = sel["petro_frac_dev"] * bt + sel["petro_frac_exp"] * (1 - bt)
    r_petro = (mags[:, 2] - 2.5 * np.log10(frac) + sel["petro_offset"]
               + sel["petro_sigma"] * rng.standard_normal(_CANDIDATES))
    return dict(cand, mags=mags, r_petro=r_petro, dcol=dcol,
                selected=(r_petro <= sel["r_lim"]) & (mags[:, 2] >= sel["r_bright"]))


def _first_selected(draw: Callable[[], dict]) -> dict:
    """The first candidate with ``selected`` of batches from ``draw()`` (one row of every column): rejection
    sampling, so a colour-dependent selection is exact."""
    while True:
        cand = draw()
        ok = np.flatnonzero(cand["selected"])
        if ok.size:
            return {key: col[int(ok[0])] for key, col in cand.items()}


def _bulge_disk(w: np.ndarray, bt: float, sed: dict, abs_r: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Bulge fraction (of rest-r light) and separate bulge/disk SEDs whose light-weighted sum is w.

    The bulge takes the mean red-sequence SED (old population) blended toward the galaxy's own SED
    only as much as needed for the disk mixture to stay non-negative, so bulges are redder than disks.
    With ``sed["bulge_blend_mag"]`` = (M_bright, M_faint) the blend starts at 0 for M_r <= M_bright and
    reaches 1 (no colour gradient) at M_r >= M_faint: colour gradients vanish in low-mass galaxies
    (Tortora et al. 2010), whose central light is not that of a luminous elliptical.
    """
    w_red = np.asarray(sed["w_bulge"])
    lam0 = 0.0
    if abs_r is not None and "bulge_blend_mag" in sed:
        m_bright, m_faint = sed["bulge_blend_mag"]
        lam0 = float(np.clip((abs_r - m_bright) / (m_faint - m_bright), 0.0, 1.0))
    for lam in np.unique(np.clip([lam0, 0.25, 0.5, 0.75, 1.0], lam0, 1.0)):
        wb = lam * w + (1 - lam) * w_red
        wd = (w - bt * wb) / (1 - bt)
        if wd.min() >= -1e-9:
            wd = np.clip(wd, 0, None)
            return wb, wd / wd.sum()
    return w.copy(), w.copy()


def _half_light_kpc(abs_r: float, early: bool, rng: np.random.Generator) -> float:
    """Shen et al. (2003) R50 [kpc] with their luminosity-dependent log-normal scatter."""
    if early:
        p = _SHEN_EARLY
        log_r = -0.4 * p["a"] * abs_r + p["b"]
        m0 = _SHEN_LATE["m0"]
    else:
        p = _SHEN_LATE
        m0 = p["m0"]
        log_r = -0.4 * p["alpha"] * abs_r + (p["beta"] - p["alpha"]) * np.log10(1 + 10 ** (-0.4 * (abs_r - m0))) + p["gamma"]
    sig = p["s2"] + (p["s1"] - p["s2"]) / (1 + 10 ** (-0.8 * (abs_r - m0)))
    return float(10**log_r * np.exp(sig * rng.standard_normal()))


def _galaxy(rng: np.random.Generator, index: int, cand: dict, sed: dict,
            k_terms_of: Callable[[np.ndarray, np.ndarray], np.ndarray], ab_offset: np.ndarray | float,
            psf_fwhm: np.ndarray) -> dict:
    """The selected candidate ``cand`` made a galaxy: bulge/disk split, sizes, shapes, position, E(B-V) and
    observing conditions, drawn from ``rng`` in the order every survey shares (``draw_galaxy``'s keys but
    ``specz_err`` and ``rng``, which the caller adds: its spec-z error relation is per survey).

    ``k_terms_of(w, z)``: the survey's k-terms; ``ab_offset``: subtracted from the bulge/disk magnitudes (SDSS's
    AB -> SDSS offsets, 0 for AB surveys); ``psf_fwhm``: the median seeing per band.
    """
    z, abs_r, w, red = float(cand["z"]), float(cand["abs_r"]), cand["w"], bool(cand["red"])
    bt, dcol, mag = float(cand["bt"]), cand["dcol"], cand["mags"]
    wb, wd = _bulge_disk(w, bt, sed, abs_r)
    # Bulge/disk observed fluxes: their rest-r light split bt : 1-bt, each through its own SED.
    kb, kd = k_terms_of(np.stack([wb, wd]), np.array([z, z]))
    base = abs_r + float(cosmology.distance_modulus(np.array([z]))[0])
    r50 = float(cosmology.kpc_to_arcsec(_half_light_kpc(abs_r, red, rng), z))
    cos_i = rng.random()
    q0 = 0.2
    ra, dec = sky.draw_position(rng)
    ebv = sky.draw_ebv(float(sky.galactic_latitude(np.array(ra), np.array(dec))), rng)
    return dict(
        index=index,
        z=z,
        abs_r=abs_r,
        red=red,
        w=w,
        mag=mag,
        bulge_frac=bt,
        bulge_mag=np.where(bt > 0, base + kb - 2.5 * np.log10(max(bt, 1e-12)), np.inf) - ab_offset + dcol,
        disk_mag=np.where(bt < 1, base + kd - 2.5 * np.log10(max(1 - bt, 1e-12)), np.inf) - ab_offset + dcol,
        r50=r50,
        bulge_hlr=r50 * (0.35 + 0.65 * bt),
        disk_hlr=r50 * (1.0 + 0.5 * bt),
        disk_q=float(np.sqrt(cos_i**2 * (1 - q0**2) + q0**2)),
        bulge_q=float(np.clip(rng.normal(0.8, 0.1), 0.5, 1.0)),
        beta=float(rng.uniform(0, np.pi)),
        offset=rng.uniform(-0.5, 0.5, 2),
        psf_fwhm=psf_fwhm * np.exp(SEEING_SIGMA_LN * rng.standard_normal()) * np.exp(0.03 * rng.standard_normal(len(psf_fwhm))),
        sky_dmag=SKY_SIGMA_MAG * rng.standard_normal(len(psf_fwhm)),
        ra=ra,
        dec=dec,
        ebv=ebv,
    )


def draw_galaxy(seed: int, index: int, model: SurveyModel | None = None) -> dict:
    """All parameters of galaxy ``index`` of survey ``seed`` (physical, morphology, observing conditions)."""
    model = model or survey_model()
    rng = _rng(seed, index)
    cand = _first_selected(partial(_draw_candidates, rng, model))
    g = _galaxy(rng, index, cand, model.sed, partial(k_terms, grid=model.grid), AB_OFFSET, PSF_FWHM)
    g["specz_err"] = float(np.clip(10 ** rng.normal(-4.55 + 0.12 * (g["mag"][2] - 17.0), 0.2), 5e-6, 3e-4))
    g["rng"] = rng
    return g


def sample_population(n: int, seed: int, start: int = 0, model: SurveyModel | None = None) -> dict[str, np.ndarray]:
    """Catalogue-level draw (no images) of galaxies start..start+n: z, M_r, SDSS model mags, red flag (of the
    prototype), template light fractions w."""
    model = model or survey_model()
    gals = [draw_galaxy(seed, i, model) for i in range(start, start + n)]
    return {
        "z": np.array([g["z"] for g in gals]),
        "abs_r": np.array([g["abs_r"] for g in gals]),
        "mag": np.stack([g["mag"] for g in gals]),
        "red": np.array([g["red"] for g in gals]),
        "w": np.stack([g["w"] for g in gals]),
        "r50": np.array([g["r50"] for g in gals]),
        "bulge_frac": np.array([g["bulge_frac"] for g in gals]),
        "ebv": np.array([g["ebv"] for g in gals]),
    }


# ---- other surveys: the same population observed through another survey's filters ----------------------------

#: log-mean wavelengths (Angstrom) of kcorrect's sdss_u0 ... sdss_z0 (``bandpass.effective_wavelength``; a test
#: recomputes them): where the calibrated colour residuals sit in the spectrum.
SDSS_WAVE_EFF = np.array([3546.0, 4669.6, 6156.25, 7471.57, 8917.4])


@dataclass(frozen=True)
class BandModel:
    """Sampling tables of a synthetic survey seen through other filters than SDSS's (docs/synthetic_survey.md).

    The population (LF and its evolution, SED prototypes, colour residuals, sizes) is ``base``, the one calibrated
    on the SDSS MGS; ``grid`` holds the same templates through the survey's filters (all its bands, rest-frame SDSS
    r normalisation from ``base.grid``), and the flux limit is ``mag_limit`` in band ``select`` (total magnitude,
    extinction-corrected), with z drawn in [base z_min, z_max].
    """

    base: SurveyModel
    bands: tuple[str, ...]
    grid: TemplateGrid
    wave_eff: np.ndarray
    psf_fwhm: np.ndarray
    select: int
    mag_limit: float
    z_tab: np.ndarray
    zcdf_tab: np.ndarray
    m_faint_tab: np.ndarray


def residual_margin(sed: dict) -> float:
    """How much brighter than its templates (4 sigma) a colour residual can make any band: the draw's room."""
    if "resid_a" not in sed:
        return 0.0
    a, b, sd, zr = (np.asarray(sed[key]) for key in ("resid_a", "resid_b", "resid_sd", "resid_z_range"))
    ends = np.stack([a + b * (zr[:, i:i + 1] - 0.1) for i in (0, 1)])  # the trend is linear inside zr
    return float(max(0.0, np.max(-ends.min(axis=0) + 4 * sd)))


@lru_cache(maxsize=8)
def band_model(filters: tuple[str, ...], bands: tuple[str, ...], psf_fwhm: tuple[float, ...], select_band: str,
               mag_limit: float, z_max: float, grid_dir: str | None = None) -> BandModel:
    """Sampling tables for a survey's filters, flux limit and redshift range (cached per process).

    n(z) is the LF times the volume inside the faintest M_r any template mixture (and a 4-sigma colour residual)
    could still pass at each z, as ``survey_model`` does for SDSS r; the exact limit is applied per galaxy.
    """
    from photoz_hpc.sim.bandpass import load_band_grid

    base = survey_model()
    grid, wave = load_band_grid(filters, z_max, grid_dir)
    lf, sel = base.lf, base.sel
    s = bands.index(select_band)
    z_tab = np.linspace(sel["z_min"], z_max, 1601)
    k_min = np.min(-2.5 * np.log10(grid.at(z_tab)[:, :, s] / base.grid.rest_r[None, :]), axis=1)
    m_faint = np.minimum(mag_limit - cosmology.distance_modulus(z_tab) - k_min + 0.05 + residual_margin(base.sed),
                         lf["M_faint"])
    m_star = lf["M_star"] - lf["Q"] * (z_tab - 0.1)
    lo = np.interp(lf["M_bright"] - m_star, base.x_tab, base.xcdf_tab)
    hi = np.interp(m_faint - m_star, base.x_tab, base.xcdf_tab)
    dens = cosmology.dvdz(z_tab) * np.maximum(hi - lo, 0) * 10 ** (0.4 * lf.get("P", 0.0) * (z_tab - 0.1))
    zcdf = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(z_tab))])
    if not zcdf[-1] > 0:
        raise ConfigError(f"synthetic selection {select_band} <= {mag_limit} at z <= {z_max}: no galaxy of the "
                          f"population (M_r {lf['M_bright']}..{lf['M_faint']}) can pass it")
    return BandModel(base, bands, grid, wave, np.asarray(psf_fwhm, dtype=float), s, float(mag_limit), z_tab,
                     zcdf / zcdf[-1], m_faint)


def band_residuals(k: np.ndarray, z: np.ndarray, normals: np.ndarray, sed: dict, wave_eff: np.ndarray) -> np.ndarray:
    """The calibrated colour residuals (``colour_residuals``, SDSS ugriz) carried to other filters (n, nband).

    The residuals are what the templates miss of real spectra, so they are placed at rest-frame wavelengths
    (SDSS band / (1 + z), z clipped to the prototype's range as in ``colour_residuals``) and interpolated in
    log wavelength at each band's rest-frame wavelength lambda_b / (1 + z), held at the end values outside
    (bluer than rest u, redder than rest z: extrapolated). SDSS filters at a z inside the range give back
    ``colour_residuals`` itself.
    """
    z = np.asarray(z, dtype=float)
    if "resid_a" not in sed:
        return np.zeros((len(k), len(wave_eff)))
    d = colour_residuals(k, z, normals, sed)
    zc = np.clip(z, *(np.asarray(sed["resid_z_range"])[k].T))
    x_sdss = np.log(SDSS_WAVE_EFF[None, :] / (1 + zc[:, None]))
    x_band = np.log(np.asarray(wave_eff)[None, :] / (1 + z[:, None]))
    return np.stack([np.interp(x_band[i], x_sdss[i], d[i]) for i in range(len(k))])


def _draw_band_candidates(rng: np.random.Generator, model: BandModel) -> dict:
    """``_draw_candidates`` through the survey's filters: _CANDIDATES (z, M_r, SED, colour residual) draws;
    ``selected``: total magnitude <= the limit in the selection band."""
    base = model.base
    cand = _draw_population(rng, base, model)
    z = cand["z"]
    dcol = band_residuals(cand["proto"], z, cand.pop("resid_normals"), base.sed, model.wave_eff)
    kt = k_terms_through(cand["w"], z, base.grid, model.grid)
    mags = cand["abs_r"][:, None] + cosmology.distance_modulus(z)[:, None] + kt + dcol
    return dict(cand, mags=mags, dcol=dcol, selected=mags[:, model.select] <= model.mag_limit)


def draw_band_galaxy(seed: int, index: int, model: BandModel) -> dict:
    """Galaxy ``index`` of survey ``seed`` through the model's filters: the keys of ``draw_galaxy`` (magnitudes AB,
    one per band of the survey), the first candidate with total magnitude <= the limit in the selection band."""
    rng = _rng(seed, index)
    cand = _first_selected(partial(_draw_band_candidates, rng, model))
    g = _galaxy(rng, index, cand, model.base.sed, partial(k_terms_through, rest=model.base.grid, obs=model.grid),
                0.0, model.psf_fwhm)
    # the MGS spec-z error relation at the selection-band magnitude relative to the limit, times (1 + z)
    mu = -4.55 + 0.12 * (g["mag"][model.select] - model.mag_limit + 0.77)
    g["specz_err"] = float(np.clip(10 ** rng.normal(mu, 0.2), 5e-6, 3e-4) * (1 + g["z"]) / 1.1)
    g["rng"] = rng
    return g


def sample_band_population(n: int, seed: int, model: BandModel, start: int = 0) -> dict[str, np.ndarray]:
    """``sample_population`` through a survey's filters (AB magnitudes in all its bands)."""
    gals = [draw_band_galaxy(seed, i, model) for i in range(start, start + n)]
    return {key: np.array([g[key] for g in gals]) for key in ("z", "abs_r", "mag", "red", "w", "r50", "bulge_frac",
                                                               "ebv", "psf_fwhm")}
