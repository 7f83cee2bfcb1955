//! The statistics of kd-eval's intervals and kd-report's verdicts: Wilson intervals for
//! accuracies, percentile bootstrap intervals over records or items (seeded, so a report
//! is reproducible), paired bootstrap differences, and McNemar's exact test for paired
//! accuracies. tests/test_report.py checks them against scipy and statsmodels.
use crate::base::rng::SplitMix64;

/// Two-sided 95%: the standard normal quantile at 0.975 (scipy.stats.norm.ppf(0.975)).
pub const Z95: f64 = 1.959_963_984_540_054;
/// Bootstrap resamples unless a stage's flag says otherwise, and the fixed seed they are
/// drawn with (reports are reproducible byte for byte).
pub const BOOTSTRAP_SAMPLES: usize = 1000;
pub const BOOTSTRAP_SEED: u64 = 0;

/// Wilson score interval of a binomial proportion (`successes` of `n`) at 95%; the same as
/// statsmodels' `proportion_confint(method="wilson")` and scipy's
/// `binomtest(k, n).proportion_ci(method="wilson")`. (0, 1) when `n` is 0.
pub fn wilson_interval(successes: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (k, n) = (successes as f64, n as f64);
    let p = k / n;
    let z2 = Z95 * Z95;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = Z95 / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    // At 0 or n successes the bound is exactly 0 or 1; the formula leaves rounding there.
    let lo = if successes == 0 { 0.0 } else { (centre - half).max(0.0) };
    let hi = if successes as f64 == n { 1.0 } else { (centre + half).min(1.0) };
    (lo, hi)
}

/// McNemar's exact test over paired binary outcomes: `b` items only the first model got
/// right, `c` only the second. Two-sided p = min(1, 2 P(X <= min(b, c))), X ~ Bin(b + c, 1/2),
/// as statsmodels' `mcnemar(table, exact=True)`.
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    let k = b.min(c);
    // log C(n, i) from running sums of logs: exact enough for n in the millions.
    let ln_fact: Vec<f64> = std::iter::once(0.0)
        .chain((1..=n).scan(0.0, |acc, i| {
            *acc += (i as f64).ln();
            Some(*acc)
        }))
        .collect();
    let half_n = n as f64 * 0.5f64.ln();
    let cdf: f64 = (0..=k).map(|i| (ln_fact[n] - ln_fact[i] - ln_fact[n - i] + half_n).exp()).sum();
    (2.0 * cdf).min(1.0)
}

/// Discordant counts of two paired outcome lists: (only `a` right, only `b` right).
pub fn discordant(a: &[bool], b: &[bool]) -> (usize, usize) {
    a.iter().zip(b).fold((0, 0), |(x, y), (&p, &q)| (x + (p && !q) as usize, y + (!p && q) as usize))
}

/// The 2.5% and 97.5% percentiles of `values` (linear interpolation between order
/// statistics, numpy's default).
pub fn percentile_interval(values: &mut [f64]) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    (quantile_sorted(values, 0.025), quantile_sorted(values, 0.975))
}

/// The `q` quantile of sorted values, numpy's linear method.
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Median and (min, max) of repeated measurements.
pub fn median_range(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    (quantile_sorted(&v, 0.5), *v.first().unwrap_or(&f64::NAN), *v.last().unwrap_or(&f64::NAN))
}

/// `samples` values of `statistic` over resamples (with replacement) of `n` item indices.
/// The i-th resample depends only on (`seed`, i), so two statistics bootstrapped with the
/// same seed see the same resamples: that is what makes a paired comparison paired.
pub fn bootstrap(n: usize, samples: usize, seed: u64, mut statistic: impl FnMut(&[usize]) -> f64) -> Vec<f64> {
    let mut idx = vec![0usize; n];
    (0..samples)
        .map(|i| {
            let mut rng = SplitMix64::for_key(seed, i as u64);
            idx.iter_mut().for_each(|x| *x = rng.below(n));
            statistic(&idx)
        })
        .collect()
}

/// A ratio of sums over a resample: sum(num[i]) / sum(den[i]).
pub fn ratio_of_sums(num: &[f64], den: &[f64], idx: &[usize]) -> f64 {
    let (a, b) = idx.iter().fold((0.0, 0.0), |(a, b), &i| (a + num[i], b + den[i]));
    a / b
}

/// 95% percentile-bootstrap interval of `transform(sum num / sum den)` over items:
/// perplexity is exp of the token-weighted NLL (num = NLL sums per record, den = tokens),
/// teacher KL the token-weighted mean KL.
pub fn bootstrap_ratio_ci(num: &[f64], den: &[f64], samples: usize, seed: u64, transform: impl Fn(f64) -> f64) -> (f64, f64) {
    let mut v = bootstrap(num.len(), samples, seed, |idx| transform(ratio_of_sums(num, den, idx)));
    percentile_interval(&mut v)
}

/// 95% percentile-bootstrap interval of a plain mean (each item weighs one).
pub fn bootstrap_mean_ci(xs: &[f64], samples: usize, seed: u64) -> (f64, f64) {
    bootstrap_ratio_ci(xs, &vec![1.0; xs.len()], samples, seed, |x| x)
}

/// A paired comparison: the observed difference of a statistic between two models over the
/// same items, the evidence (a bootstrap interval, or McNemar's p for accuracies), and the
/// verdict for the first model.
#[derive(Clone, Debug, PartialEq)]
pub struct Paired {
    pub diff: f64,
    /// 95% paired-bootstrap interval of the difference (perplexity, KL).
    pub interval: Option<(f64, f64)>,
    /// McNemar's exact p (accuracies): the test decides, so no interval that could disagree
    /// with it is shown.
    pub p_value: Option<f64>,
    pub verdict: Verdict,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Better,
    Worse,
    NoSignificantDifference,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Better => "better",
            Verdict::Worse => "worse",
            Verdict::NoSignificantDifference => "no significant difference",
        }
    }
}

/// Paired bootstrap of `transform(ratio of sums)` for model A minus model B over the same
/// items (one resample of item indices feeds both). `lower_is_better` for perplexity and KL.
/// "no significant difference" when the interval covers zero.
#[allow(clippy::too_many_arguments)]
pub fn paired_bootstrap(
    a: (&[f64], &[f64]),
    b: (&[f64], &[f64]),
    samples: usize,
    seed: u64,
    transform: impl Fn(f64) -> f64,
    lower_is_better: bool,
) -> Paired {
    let diff_on = |idx: &[usize]| transform(ratio_of_sums(a.0, a.1, idx)) - transform(ratio_of_sums(b.0, b.1, idx));
    let all: Vec<usize> = (0..a.0.len()).collect();
    let diff = diff_on(&all);
    let mut v = bootstrap(a.0.len(), samples, seed, diff_on);
    let (low, high) = percentile_interval(&mut v);
    let verdict = if low <= 0.0 && high >= 0.0 {
        Verdict::NoSignificantDifference
    } else if (diff < 0.0) == lower_is_better {
        Verdict::Better
    } else {
        Verdict::Worse
    };
    Paired { diff, interval: Some((low, high)), p_value: None, verdict }
}

/// Paired accuracies: difference A - B over the same items, and the verdict from McNemar's
/// exact test at 5%.
pub fn paired_accuracy(a: &[bool], b: &[bool]) -> Paired {
    let (x, y) = discordant(a, b);
    let p = mcnemar_exact(x, y);
    let verdict = if p >= 0.05 {
        Verdict::NoSignificantDifference
    } else if x > y {
        Verdict::Better
    } else {
        Verdict::Worse
    };
    Paired { diff: (x as f64 - y as f64) / a.len().max(1) as f64, interval: None, p_value: Some(p), verdict }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_statsmodels() {
        // statsmodels.stats.proportion.proportion_confint(66, 200, method="wilson")
        let (lo, hi) = wilson_interval(66, 200);
        assert!((lo - 0.268_574_258_7).abs() < 1e-9 && (hi - 0.397_833_152_3).abs() < 1e-9, "{lo} {hi}");
        assert_eq!(wilson_interval(0, 0), (0.0, 1.0));
        let (lo, hi) = wilson_interval(10, 10);
        assert!(hi == 1.0 && lo > 0.69 && lo < 0.73);
    }

    #[test]
    fn mcnemar_exact_matches_binomial_tail() {
        // scipy.stats.binomtest(3, 15, 0.5).pvalue == 0.03515625
        assert!((mcnemar_exact(3, 12) - 0.03515625).abs() < 1e-12);
        assert!((mcnemar_exact(12, 3) - 0.03515625).abs() < 1e-12);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        assert_eq!(mcnemar_exact(5, 5), 1.0);
    }

    #[test]
    fn bootstrap_is_seeded_and_paired() {
        let num: Vec<f64> = (0..50).map(|i| (i % 7) as f64).collect();
        let den = vec![1.0; 50];
        let a = bootstrap_ratio_ci(&num, &den, 200, 3, |x| x);
        assert_eq!(a, bootstrap_ratio_ci(&num, &den, 200, 3, |x| x));
        assert!(a.0 < 3.0 && a.1 > 2.6 && a.0 < a.1);
        // A model identical to B: difference exactly 0 on every resample.
        let p = paired_bootstrap((&num, &den), (&num, &den), 200, 0, |x| x, true);
        assert_eq!((p.diff, p.interval, p.verdict), (0.0, Some((0.0, 0.0)), Verdict::NoSignificantDifference));
        // B worse by 1 on every item: a certain difference, whatever the noise across items.
        let worse: Vec<f64> = num.iter().map(|x| x + 1.0).collect();
        let p = paired_bootstrap((&num, &den), (&worse, &den), 200, 0, |x| x, true);
        assert_eq!(p.verdict, Verdict::Better);
        let (lo, hi) = p.interval.unwrap();
        assert!((lo + 1.0).abs() < 1e-9 && (hi + 1.0).abs() < 1e-9);
    }

    #[test]
    fn accuracy_verdict_follows_mcnemar() {
        let a: Vec<bool> = (0..200).map(|i| i % 3 != 0).collect();
        // b agrees with a except on 3 items: far from significant.
        let mut b = a.clone();
        for i in [1, 2, 4] {
            b[i] = !b[i];
        }
        assert_eq!(paired_accuracy(&a, &b).verdict, Verdict::NoSignificantDifference);
        let b = vec![false; 200];
        let r = paired_accuracy(&a, &b);
        assert_eq!(r.verdict, Verdict::Better);
        assert!(r.p_value.unwrap() < 1e-10 && (r.diff - 133.0 / 200.0).abs() < 1e-12);
        assert_eq!(paired_accuracy(&b, &a).verdict, Verdict::Worse);
    }

    #[test]
    fn quantiles_follow_numpy() {
        // numpy.quantile([1, 2, 3, 4], [0.025, 0.5, 0.975]) == [1.075, 2.5, 3.925]
        let v = [1.0, 2.0, 3.0, 4.0];
        assert!((quantile_sorted(&v, 0.025) - 1.075).abs() < 1e-12);
        assert!((quantile_sorted(&v, 0.975) - 3.925).abs() < 1e-12);
        assert_eq!(median_range(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
    }
}
