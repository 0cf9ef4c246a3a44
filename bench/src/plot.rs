//! Plots of a run, each written as SVG and PNG:
//!
//! * a sweep (several points): throughput and goodput vs load, and p50/p90/p99
//!   latency vs load (log scale, so an overload knee and a fast region both show);
//! * a profile (one point that varies in time): offered, sent, successful and rejected
//!   requests per second, and p99 latency per second.
//!
//! Text needs a font file; plotters' `ab_glyph` backend reads one at run time, so the
//! binary needs no font library to build. [`init_font`] looks for a common sans-serif
//! TTF (or the one given); without any, plots are drawn without text and a warning
//! says so.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, Result};
use plotters::chart::MeshStyle;
use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::report::{PointReport, RunReport};

/// Fonts tried in order when none is given: DejaVu, Liberation, Noto, macOS Arial.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
];

const FONT: &str = "sans-serif";

static FONT_LOADED: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Loads a font for plot text once per process: `explicit` if given, else the first of
/// the usual system fonts. Returns the font used, or None (plots will have no text).
pub fn init_font(explicit: Option<&Path>) -> Option<PathBuf> {
    FONT_LOADED
        .get_or_init(|| {
            let candidates: Vec<PathBuf> = match explicit {
                Some(p) => vec![p.to_owned()],
                None => FONT_CANDIDATES.iter().map(PathBuf::from).collect(),
            };
            candidates.into_iter().find(|p| register(p))
        })
        .clone()
}

fn register(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    // plotters keeps fonts for the life of the process; this runs at most once.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok()
}

/// Whether plot text can be drawn (a font was loaded).
fn text() -> bool {
    FONT_LOADED.get().is_some_and(Option::is_some)
}

/// Writes `<prefix>.svg` and `<prefix>.png` of the sweep (throughput and latency vs
/// load) and returns their paths.
pub fn sweep(report: &RunReport, prefix: &Path) -> Result<Vec<PathBuf>> {
    let figure = Figure::Sweep(SweepData::of(report));
    save(&figure, prefix, (1200, 480))
}

/// Writes `<prefix>.svg` and `<prefix>.png` of one point's time series.
pub fn timeline(point: &PointReport, title: &str, prefix: &Path) -> Result<Vec<PathBuf>> {
    let figure = Figure::Timeline(TimelineData::of(point, title));
    save(&figure, prefix, (1200, 720))
}

fn save(figure: &Figure, prefix: &Path, size: (u32, u32)) -> Result<Vec<PathBuf>> {
    if let Some(dir) = prefix.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let svg = with_suffix(prefix, "svg");
    let png = with_suffix(prefix, "png");
    let fail =
        |path: &Path, e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
    figure
        .draw(&SVGBackend::new(&svg, size).into_drawing_area())
        .map_err(|e| fail(&svg, &e))?;
    {
        let area = BitMapBackend::new(&png, size).into_drawing_area();
        figure.draw(&area).map_err(|e| fail(&png, &e))?;
        area.present().map_err(|e| fail(&png, &e))?;
    }
    Ok(vec![svg, png])
}

fn with_suffix(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// One line of a chart.
struct Line {
    name: &'static str,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

struct SweepData {
    title: String,
    x_label: &'static str,
    /// Throughput panel: requests per second vs load.
    rates: Vec<Line>,
    /// Latency panel: milliseconds vs load.
    latencies: Vec<Line>,
}

impl SweepData {
    fn of(report: &RunReport) -> SweepData {
        let closed = report.mode == "closed";
        let x = |p: &PointReport| {
            if closed {
                p.concurrency.unwrap_or(0) as f64
            } else {
                p.offered_rps.unwrap_or(0.0)
            }
        };
        let line = |name, color, y: &dyn Fn(&PointReport) -> Option<f64>| Line {
            name,
            color,
            points: report
                .points
                .iter()
                .filter_map(|p| Some((x(p), y(p)?)))
                .collect(),
        };
        let mut rates = vec![
            line("successes/s", BLUE, &|p| Some(p.throughput_rps)),
            line("goodput/s", GREEN_DARK, &|p| Some(p.goodput_rps)),
            line("rejected/s", RED, &|p| {
                Some(
                    p.latency_ms
                        .rejected
                        .as_ref()
                        .map_or(0.0, |r| r.count as f64 / p.window_s),
                )
            }),
        ];
        if !closed {
            rates.insert(0, line("offered/s", GREY, &|p| p.offered_rps));
        }
        let latencies = vec![
            line("p50", GREEN_DARK, &|p| {
                p.latency_ms.ok.as_ref().map(|s| s.p50)
            }),
            line("p90", ORANGE, &|p| p.latency_ms.ok.as_ref().map(|s| s.p90)),
            line("p99", RED, &|p| p.latency_ms.ok.as_ref().map(|s| s.p99)),
        ];
        let t = &report.target;
        SweepData {
            title: format!("{}: model {}, batch {}", report.name, t.model, t.batch_size),
            x_label: if closed {
                "concurrent clients"
            } else {
                "offered load (requests/s)"
            },
            rates,
            latencies,
        }
    }
}

struct TimelineData {
    title: String,
    rates: Vec<Line>,
    p99: Vec<Line>,
}

impl TimelineData {
    fn of(point: &PointReport, title: &str) -> TimelineData {
        let series = |f: &dyn Fn(&crate::report::SeriesPoint) -> Option<f64>| -> Vec<(f64, f64)> {
            // Each value covers one second: plot it at the middle of its second.
            point
                .series
                .iter()
                .filter_map(|s| Some((s.t_s + 0.5, f(s)?)))
                .collect()
        };
        TimelineData {
            title: title.to_owned(),
            rates: vec![
                Line {
                    name: "offered/s",
                    color: GREY,
                    points: series(&|s| s.offered_rps),
                },
                Line {
                    name: "successes/s",
                    color: BLUE,
                    points: series(&|s| Some(s.ok as f64)),
                },
                Line {
                    name: "rejected/s",
                    color: RED,
                    points: series(&|s| Some(s.rejected as f64)),
                },
            ],
            p99: vec![Line {
                name: "p99",
                color: ORANGE,
                points: series(&|s| s.ok_p99_ms),
            }],
        }
    }
}

const GREY: RGBColor = RGBColor(140, 140, 140);
const GREEN_DARK: RGBColor = RGBColor(0, 140, 60);
const ORANGE: RGBColor = RGBColor(230, 130, 0);

enum Figure {
    Sweep(SweepData),
    Timeline(TimelineData),
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

impl Figure {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        let title = match self {
            Figure::Sweep(d) => d.title.as_str(),
            Figure::Timeline(d) => d.title.as_str(),
        };
        let body = if text() {
            root.titled(title, (FONT, 22))?
        } else {
            root.clone()
        };
        match self {
            Figure::Sweep(d) => {
                let (left, right) = body.split_horizontally(body.dim_in_pixel().0 / 2);
                let panel = |title, y_label, log| Panel {
                    title,
                    x_label: d.x_label,
                    y_label,
                    log_y: log,
                };
                draw_panel(&left, &panel("Throughput", "requests/s", false), &d.rates)?;
                draw_panel(
                    &right,
                    &panel("Latency of successes", "ms (log)", true),
                    &d.latencies,
                )
            }
            Figure::Timeline(d) => {
                let (top, bottom) = body.split_vertically(body.dim_in_pixel().1 * 3 / 5);
                let panel = |title, y_label, log| Panel {
                    title,
                    x_label: "time (s)",
                    y_label,
                    log_y: log,
                };
                draw_panel(
                    &top,
                    &panel("Requests per second", "requests/s", false),
                    &d.rates,
                )?;
                draw_panel(
                    &bottom,
                    &panel("p99 latency per second", "ms (log)", true),
                    &d.p99,
                )
            }
        }
    }
}

struct Panel<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    log_y: bool,
}

/// Width of the key to the right of each panel.
const KEY_WIDTH: u32 = 130;

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel<'_>,
    lines: &[Line],
) -> DrawResult<DB> {
    let (plot_area, key_area) = if text() {
        area.split_horizontally(area.dim_in_pixel().0.saturating_sub(KEY_WIDTH))
    } else {
        (area.clone(), area.clone())
    };
    let all = || lines.iter().flat_map(|l| l.points.iter());
    let x = span(all().map(|p| p.0), false);
    let mut builder = ChartBuilder::on(&plot_area);
    builder
        .margin(12)
        .x_label_area_size(if text() { 40 } else { 8 })
        .y_label_area_size(if text() { 64 } else { 8 });
    if text() {
        builder.caption(panel.title, (FONT, 17));
    }
    if panel.log_y {
        let y = span(all().map(|p| p.1).filter(|v| *v > 0.0), true);
        let mut chart = builder.build_cartesian_2d(x, y.log_scale())?;
        mesh(&mut chart.configure_mesh(), panel)?;
        for l in lines {
            let points = l.points.iter().copied().filter(|p| p.1 > 0.0);
            chart.draw_series(LineSeries::new(points, l.color.stroke_width(2)).point_size(3))?;
        }
    } else {
        let y = span(all().map(|p| p.1), false);
        let mut chart = builder.build_cartesian_2d(x, y)?;
        mesh(&mut chart.configure_mesh(), panel)?;
        for l in lines {
            chart.draw_series(
                LineSeries::new(l.points.iter().copied(), l.color.stroke_width(2)).point_size(3),
            )?;
        }
    }
    if text() {
        key(&key_area, lines)?;
    }
    Ok(())
}

fn mesh<DB, Y>(
    mesh: &mut MeshStyle<'_, '_, RangedCoordf64, Y, DB>,
    panel: &Panel<'_>,
) -> DrawResult<DB>
where
    DB: DrawingBackend,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    mesh.light_line_style(WHITE.mix(0.0));
    if text() {
        mesh.x_desc(panel.x_label)
            .y_desc(panel.y_label)
            .x_labels(8)
            .x_label_formatter(&number)
            .y_label_formatter(&number)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw()
}

/// The key beside a panel (outside the plot, so it never hides data).
fn key<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, lines: &[Line]) -> DrawResult<DB> {
    let mut y = 48;
    for l in lines {
        area.draw(&PathElement::new(
            vec![(4, y), (26, y)],
            l.color.stroke_width(3),
        ))?;
        area.draw(&Text::new(l.name, (32, y - 7), (FONT, 14)))?;
        y += 22;
    }
    Ok(())
}

/// An axis label: at most three decimals, without trailing zeros.
fn number(v: &f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_owned()
    } else {
        s.to_owned()
    }
}

/// An axis range covering `values` with some headroom (a decade-rounded one for log axes).
fn span(values: impl Iterator<Item = f64>, log: bool) -> Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return if log { 0.1..10.0 } else { 0.0..1.0 };
    }
    if log {
        let lo = 10f64.powf(lo.log10().floor());
        let hi = 10f64.powf(hi.log10().ceil()).max(lo * 10.0);
        lo..hi
    } else {
        let hi = if hi > lo.min(0.0) { hi * 1.08 } else { 1.0 };
        lo.min(0.0)..hi
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_have_headroom() {
        assert_eq!(span([1.0, 50.0].into_iter(), false), 0.0..54.0);
        assert_eq!(span([0.3, 42.0].into_iter(), true), 0.1..100.0);
        assert_eq!(span([5.0].into_iter(), true), 1.0..10.0);
        assert_eq!(span(std::iter::empty(), true), 0.1..10.0);
        assert_eq!(span([0.0, 0.0].into_iter(), false), 0.0..1.0);
    }

    #[test]
    fn axis_numbers_are_short() {
        assert_eq!(number(&1500.0), "1500");
        assert_eq!(number(&0.25), "0.25");
        assert_eq!(number(&10.0), "10");
        assert_eq!(number(&0.0), "0");
    }

    #[test]
    fn suffix_keeps_dots_in_the_name() {
        assert_eq!(
            with_suffix(Path::new("out/mlp.v2-sweep"), "png"),
            PathBuf::from("out/mlp.v2-sweep.png")
        );
    }
}
