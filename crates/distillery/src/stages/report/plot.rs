//! The curves: a grid of panels, size (parameters, bytes on disk, ms/token) across and
//! quality (perplexity, teacher KL, multiple-choice accuracy) down. One line per strategy
//! through the mean over seeds with min-max error bars, the teacher as a dashed reference
//! line, the Pareto frontier as a grey band. Drawn once as SVG and once as PNG through the
//! same code; the PNG's text uses the vendored DejaVu Sans (assets/), so no system font is
//! needed. Tick marks come from [`nice_ticks`] and always enclose the data.
use super::Row;
use crate::base::io::write_atomic;
use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

/// DejaVu Sans (Bitstream Vera licence, see assets/DejaVuSans.LICENSE): text measurement for
/// both backends and glyphs for the PNG.
static FONT: &[u8] = include_bytes!("../../../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font is compiled in and known to parse; failure would be a build defect.
        plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).map_err(|_| ()).expect("vendored font parses");
    });
}

#[derive(Clone, Copy, PartialEq)]
enum XAxis {
    Params,
    Bytes,
    Latency,
}

impl XAxis {
    fn label(self) -> &'static str {
        match self {
            XAxis::Params => "parameters (log scale)",
            XAxis::Bytes => "bytes on disk (log scale)",
            XAxis::Latency => "ms/token at batch 1 (log scale)",
        }
    }
    fn value(self, r: &Row) -> Option<f64> {
        match self {
            XAxis::Params => r.f("params"),
            XAxis::Bytes => r.f("bytes_on_disk"),
            XAxis::Latency => r.latency.map(|l| l.0),
        }
    }
    fn tick(self, v: f64) -> String {
        match self {
            XAxis::Params => format!("{}M", trim(v / 1e6)),
            XAxis::Bytes => format!("{} MB", trim(v / 1e6)),
            XAxis::Latency => format!("{} ms", trim(v)),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum YAxis {
    Perplexity,
    Kl,
    Mc,
}

impl YAxis {
    fn label(self) -> &'static str {
        match self {
            YAxis::Perplexity => "held-out perplexity (log scale)",
            YAxis::Kl => "KL from the teacher",
            YAxis::Mc => "multiple-choice accuracy",
        }
    }
    fn value(self, r: &Row) -> Option<f64> {
        match self {
            YAxis::Perplexity => r.f("perplexity"),
            YAxis::Kl => r.f("teacher_kl"),
            YAxis::Mc => r.f("mc_accuracy").map(|a| 100.0 * a),
        }
    }
    fn lower_is_better(self) -> bool {
        !matches!(self, YAxis::Mc)
    }
    fn log(self) -> bool {
        matches!(self, YAxis::Perplexity)
    }
    fn tick(self, v: f64) -> String {
        match self {
            YAxis::Mc => format!("{}%", trim(v)),
            _ => trim(v),
        }
    }
}

/// A number with no more decimals than it needs (at most 3).
fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Tick values that enclose [lo, hi]: the first at or below lo, the last at or above hi.
/// Linear axes (and log axes spanning less than a factor 3) step by 1, 2 or 5 times a power
/// of ten, about five steps (the steps plotters picks itself on a linear axis); wider log axes take 1, 2, 5 per decade (1 per decade
/// past five decades).
pub fn nice_ticks(lo: f64, hi: f64, log: bool) -> Vec<f64> {
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else if log {
        (lo / 1.25, hi * 1.25)
    } else {
        let pad = (lo.abs() * 0.1).max(1e-3);
        (lo - pad, hi + pad)
    };
    if log && hi / lo >= 3.0 {
        let decades = (hi / lo).log10();
        let mantissas: &[f64] = if decades > 5.0 { &[1.0] } else { &[1.0, 2.0, 5.0] };
        let mut all = vec![];
        for e in (lo.log10().floor() as i32 - 1)..=(hi.log10().ceil() as i32 + 1) {
            all.extend(mantissas.iter().map(|m| m * 10f64.powi(e)));
        }
        let first = all.iter().rposition(|&t| t <= lo * (1.0 + 1e-9)).unwrap_or(0);
        let last = all.iter().position(|&t| t >= hi * (1.0 - 1e-9)).unwrap_or(all.len() - 1);
        return all[first..=last].to_vec();
    }
    let raw = (hi - lo) / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|&s| s >= raw).unwrap_or(10.0 * mag);
    let mut first = (lo / step + 1e-9).floor() * step;
    if log && first <= 0.0 {
        first = step;
    }
    let n = ((hi - first) / step - 1e-9).ceil().max(1.0) as usize;
    // Rounded to the step's decimals, so labels read 0.3 and not 0.30000000000000004.
    let decimals = (-(step.log10().floor()) as i32 + 1).max(0);
    let round = |v: f64| (v * 10f64.powi(decimals)).round() / 10f64.powi(decimals);
    (0..=n).map(|i| round(first + i as f64 * step)).collect()
}

/// One strategy's points at one x: mean over seeds, lowest and highest.
struct Point {
    x: f64,
    mean: f64,
    low: f64,
    high: f64,
}

struct Panel {
    x: XAxis,
    y: YAxis,
    series: Vec<(usize, Vec<Point>)>,
    teacher: Option<(f64, f64)>,
    frontier: Vec<(f64, f64)>,
    xticks: Vec<f64>,
    yticks: Vec<f64>,
}

pub(crate) struct Figure {
    title: String,
    strategies: Vec<String>,
    panels: Vec<Panel>,
    columns: usize,
    rows: usize,
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

impl Figure {
    pub fn new(rows: &[Row], title: &str) -> Figure {
        let mut strategies: Vec<String> = vec![];
        for r in rows.iter().filter(|r| !r.is_teacher()) {
            if !strategies.iter().any(|s| s == r.strategy()) {
                strategies.push(r.strategy().to_string());
            }
        }
        let xs: Vec<XAxis> = [XAxis::Params, XAxis::Bytes, XAxis::Latency].into_iter().filter(|x| rows.iter().any(|r| x.value(r).is_some())).collect();
        let ys: Vec<YAxis> = [YAxis::Perplexity, YAxis::Kl, YAxis::Mc]
            .into_iter()
            .filter(|y| rows.iter().any(|r| !r.is_teacher() && y.value(r).is_some()))
            .collect();
        let mut panels = vec![];
        for &y in &ys {
            for &x in &xs {
                panels.push(Panel::new(rows, &strategies, x, y));
            }
        }
        Figure { title: title.to_string(), strategies, panels, columns: xs.len(), rows: ys.len() }
    }

    /// Draws the SVG and the PNG; returns a description of the panels for the report.
    pub fn draw(&self, svg_path: &Path, png_path: &Path) -> Result<String> {
        register_font();
        let (w, h) = (440 * self.columns.max(1) as u32 + 40, 340 * self.rows.max(1) as u32 + 110);
        let mut svg = String::new();
        self.draw_on(&SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area())?;
        write_atomic(svg_path, svg.as_bytes())?;
        let mut rgb = vec![255u8; (w * h * 3) as usize];
        self.draw_on(&BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area())?;
        let mut png_bytes = vec![];
        {
            let mut enc = png::Encoder::new(&mut png_bytes, w, h);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut writer = enc.write_header()?;
            writer.write_image_data(&rgb)?;
            writer.finish()?;
        }
        write_atomic(png_path, &png_bytes)?;
        let ys: Vec<&str> = self.panels.iter().step_by(self.columns.max(1)).map(|p| p.y.label()).collect();
        let xs: Vec<&str> = self.panels.iter().take(self.columns).map(|p| p.x.label()).collect();
        Ok(format!("{} across, {} down", xs.join(", "), ys.join(", ")))
    }

    fn draw_on<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let err = |e: &dyn std::fmt::Display| anyhow!("drawing the plot: {e}");
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (header, grid) = root.split_vertically(90);
        header.draw(&Text::new(self.title.clone(), (20, 10), (FAMILY, 22).into_font())).map_err(|e| err(&e))?;
        // The legend, once for every panel: strategies, teacher, frontier.
        let mut x = 20;
        let mut entry = |label: &str, draw: &dyn Fn(i32) -> Result<()>| -> Result<()> {
            draw(x)?;
            header.draw(&Text::new(label.to_string(), (x + 34, 52), (FAMILY, 15).into_font())).map_err(|e| err(&e))?;
            x += 34 + 9 * label.len() as i32 + 24;
            Ok(())
        };
        for (i, s) in self.strategies.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            entry(s, &|x| {
                header.draw(&PathElement::new(vec![(x, 60), (x + 28, 60)], c.stroke_width(3))).map_err(|e| err(&e))?;
                header.draw(&Circle::new((x + 14, 60), 4, c.filled())).map_err(|e| err(&e))
            })?;
        }
        if self.panels.iter().any(|p| p.teacher.is_some()) {
            entry("teacher", &|x| {
                header.draw(&PathElement::new(vec![(x, 60), (x + 8, 60)], BLACK.stroke_width(2))).map_err(|e| err(&e))?;
                header.draw(&PathElement::new(vec![(x + 14, 60), (x + 22, 60)], BLACK.stroke_width(2))).map_err(|e| err(&e))
            })?;
        }
        entry("Pareto frontier", &|x| {
            header.draw(&PathElement::new(vec![(x, 60), (x + 28, 60)], BLACK.mix(0.18).stroke_width(10))).map_err(|e| err(&e))
        })?;
        let cells = grid.split_evenly((self.rows.max(1), self.columns.max(1)));
        for (panel, area) in self.panels.iter().zip(cells.iter()) {
            panel.draw(area).map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
        Ok(())
    }
}

impl Panel {
    fn new(rows: &[Row], strategies: &[String], x: XAxis, y: YAxis) -> Panel {
        let mut series = vec![];
        for (si, s) in strategies.iter().enumerate() {
            // Seeds of one size share parameters; group by them, place at the mean x.
            let mut by_size: BTreeMap<i64, Vec<(f64, f64)>> = BTreeMap::new();
            for r in rows.iter().filter(|r| !r.is_teacher() && r.strategy() == s) {
                if let (Some(xv), Some(yv), Some(p)) = (x.value(r), y.value(r), r.f("params")) {
                    by_size.entry(p as i64).or_default().push((xv, yv));
                }
            }
            let mut pts: Vec<Point> = by_size
                .values()
                .map(|v| {
                    let n = v.len() as f64;
                    Point {
                        x: v.iter().map(|p| p.0).sum::<f64>() / n,
                        mean: v.iter().map(|p| p.1).sum::<f64>() / n,
                        low: v.iter().map(|p| p.1).fold(f64::MAX, f64::min),
                        high: v.iter().map(|p| p.1).fold(f64::MIN, f64::max),
                    }
                })
                .collect();
            pts.sort_by(|a, b| a.x.total_cmp(&b.x));
            if !pts.is_empty() {
                series.push((si, pts));
            }
        }
        let teacher = rows.iter().find(|r| r.is_teacher()).and_then(|r| Some((x.value(r)?, y.value(r)?)));
        // The frontier: sorted by size, each point that beats every smaller one.
        let mut all: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().map(|p| (p.x, p.mean))).chain(teacher).collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(if y.lower_is_better() { a.1.total_cmp(&b.1) } else { b.1.total_cmp(&a.1) }));
        let mut frontier: Vec<(f64, f64)> = vec![];
        for p in all {
            let beats = frontier.last().is_none_or(|l| if y.lower_is_better() { p.1 < l.1 } else { p.1 > l.1 });
            if beats {
                frontier.push(p);
            }
        }
        let xv: Vec<f64> = series.iter().flat_map(|(_, p)| p.iter().map(|p| p.x)).chain(teacher.map(|t| t.0)).collect();
        let yv: Vec<f64> = series.iter().flat_map(|(_, p)| p.iter().flat_map(|p| [p.low, p.high])).chain(teacher.map(|t| t.1)).collect();
        let range = |v: &[f64]| v.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        let ((x0, x1), (y0, y1)) = (range(&xv), range(&yv));
        let (x0, x1) = if xv.is_empty() { (1.0, 10.0) } else { (x0, x1) };
        let (y0, y1) = if yv.is_empty() { (1.0, 10.0) } else { (y0, y1) };
        Panel { x, y, series, teacher, frontier, xticks: nice_ticks(x0, x1, true), yticks: nice_ticks(y0, y1, y.log()) }
    }

    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        let (x0, x1) = (self.xticks[0], *self.xticks.last().unwrap());
        let (y0, y1) = (self.yticks[0], *self.yticks.last().unwrap());
        let mut b = ChartBuilder::on(area);
        b.margin(14).x_label_area_size(42).y_label_area_size(62);
        let xspec = (x0..x1).log_scale().with_key_points(self.xticks.clone());
        macro_rules! body {
            ($chart:expr) => {{
                let mut chart = $chart;
                let (x, y) = (self.x, self.y);
                chart
                    .configure_mesh()
                    .x_desc(x.label())
                    .y_desc(y.label())
                    .x_label_formatter(&|v| x.tick(*v))
                    .y_label_formatter(&|v| y.tick(*v))
                    .y_labels(self.yticks.len())
                    .label_style((FAMILY, 13))
                    .axis_desc_style((FAMILY, 14))
                    .bold_line_style(BLACK.mix(0.12))
                    .light_line_style(TRANSPARENT)
                    .draw()?;
                if self.frontier.len() > 1 {
                    chart.draw_series(LineSeries::new(self.frontier.iter().copied(), BLACK.mix(0.16).stroke_width(10)))?;
                }
                if let Some((tx, ty)) = self.teacher {
                    chart.draw_series(DashedLineSeries::new(vec![(x0, ty), (x1, ty)], 8, 5, BLACK.stroke_width(1).into()))?;
                    chart.draw_series(std::iter::once(TriangleMarker::new((tx, ty), 7, BLACK.filled())))?;
                }
                for (si, pts) in &self.series {
                    let c = COLORS[si % COLORS.len()];
                    chart.draw_series(LineSeries::new(pts.iter().map(|p| (p.x, p.mean)), c.stroke_width(2)))?;
                    chart.draw_series(pts.iter().map(|p| ErrorBar::new_vertical(p.x, p.low, p.mean, p.high, c.stroke_width(2), 10)))?;
                    chart.draw_series(pts.iter().map(|p| Circle::new((p.x, p.mean), 4, c.filled())))?;
                }
            }};
        }
        if self.y.log() {
            body!(b.build_cartesian_2d(xspec, (y0..y1).log_scale().with_key_points(self.yticks.clone()))?);
        } else {
            // Linear: plotters' own ticks (a plain f64 range cannot carry bound key points and a
            // label formatter at once). The range runs from one nice tick to another and both
            // step by 1, 2 or 5 times a power of ten, so with as many labels allowed as
            // nice_ticks gave, plotters picks the same ticks.
            body!(b.build_cartesian_2d(xspec, y0..y1)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::nice_ticks;

    fn encloses(t: &[f64], lo: f64, hi: f64) -> bool {
        t[0] <= lo && *t.last().unwrap() >= hi && t.len() >= 2 && t.len() <= 12
    }

    #[test]
    fn ticks_enclose_the_data() {
        // The case: every model between 40 and 60 on a log axis.
        let t = nice_ticks(41.3, 58.2, true);
        assert!(encloses(&t, 41.3, 58.2) && t.len() >= 4, "{t:?}");
        assert_eq!(t, vec![40.0, 45.0, 50.0, 55.0, 60.0]);
        for (lo, hi, log) in [(0.48e6, 3.95e6, true), (39.6, 288.8, true), (0.2, 0.31, false), (0.32, 0.36, false), (1.0, 1.0, true), (0.0, 0.0, false), (3.0, 5000.0, true)] {
            let t = nice_ticks(lo, hi, log);
            assert!(encloses(&t, lo, hi), "{lo} {hi}: {t:?}");
            assert!(!log || t[0] > 0.0);
        }
        assert_eq!(nice_ticks(0.48e6, 3.95e6, true), vec![0.2e6, 0.5e6, 1e6, 2e6, 5e6]);
    }
}
