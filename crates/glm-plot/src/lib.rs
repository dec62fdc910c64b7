//! Dependency-free SVG charts for training runs.
//!
//! A training run periodically writes one SVG page (opened in any browser) with a grid of panels:
//! loss, learning rate, gradient norm, loss scale, throughput, and so on. Each [`Panel`] holds
//! [`Series`] (drawn as lines or as dots, e.g. sparse validation points) and [`Mark`]s: vertical
//! dashed red lines for interventions at a step (rollbacks, skipped steps, restarts).
//!
//! The renderer is built to never get in the way of a run:
//! - it never panics, whatever the input (NaN, ±inf, empty panels, `columns == 0`, huge values);
//! - non-finite points are skipped (and, with [`Panel::log_y`], non-positive y values), and a line
//!   is broken where points were skipped, so a NaN loss shows as a gap instead of breaking the plot;
//! - series longer than [`MAX_DRAWN_POINTS`] are thinned (min and max of each bucket kept, so
//!   spikes survive), which keeps files small for runs of any length;
//! - output is deterministic (same input, same bytes) with pixel coordinates rounded to 0.1 px;
//! - all text is XML-escaped.
//!
//! Axes get "nice" ticks (1/2/5 × 10^k) with compact labels (`1.2e-4`, `3000`, `12k`); a log y
//! axis gets ticks at powers of ten (`1e3`), or at 1/2/5 × 10^k (`2e-3`) when it spans only a decade
//! or two.
//!
//! ```
//! use glm_plot::{render_svg, Mark, Panel, Series};
//! let loss = Series::line("train", (0..100).map(|s| (s as f64, 3.0 / (1.0 + s as f64))).collect());
//! let panel = Panel {
//!     title: "loss".into(),
//!     x_label: "step".into(),
//!     series: vec![loss],
//!     marks: vec![Mark::new(40.0, "rollback")],
//!     ..Panel::default()
//! };
//! let svg = render_svg("run 7", &[panel], 2);
//! assert!(svg.starts_with("<svg"));
//! ```

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write as _};
use std::path::Path;

/// Most points drawn per series; longer series are thinned to this many (min/max per bucket).
pub const MAX_DRAWN_POINTS: usize = 2000;
/// Most marks drawn per panel; beyond this they are evenly strided.
pub const MAX_DRAWN_MARKS: usize = 500;

/// Panel size in px.
const PANEL_W: f64 = 480.0;
const PANEL_H: f64 = 300.0;
/// Space above the grid for the page title, and around the grid.
const PAGE_TITLE_H: f64 = 40.0;
const PAGE_MARGIN: f64 = 10.0;
/// Plot area inside a panel (panel-local coordinates).
const PLOT_LEFT: f64 = 74.0;
const PLOT_RIGHT: f64 = PANEL_W - 18.0;
const PLOT_TOP: f64 = 32.0;
const PLOT_BOTTOM: f64 = PANEL_H - 46.0;

/// Series colours, in order (red is left out: it is the colour of marks).
const PALETTE: [&str; 10] =
    ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79"];
const MARK_COLOUR: &str = "#d62728";
const GRID_COLOUR: &str = "#e6e6e6";
const TEXT_COLOUR: &str = "#333";

/// Most legend rows; further series are summarised as "+N more".
const MAX_LEGEND_ROWS: usize = 8;

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Style {
    /// A polyline through the points, in order (broken where points were skipped).
    #[default]
    Line,
    /// One dot per point (scatter), e.g. sparse validation points.
    Dots,
}

/// One named set of (x, y) points.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub style: Style,
}

impl Series {
    /// A line series.
    pub fn line(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series { name: name.into(), points, style: Style::Line }
    }

    /// A scatter (dots) series.
    pub fn dots(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series { name: name.into(), points, style: Style::Dots }
    }
}

/// A vertical dashed red line across the panel at `x`, with a short label (e.g. an intervention at a
/// step). Marks outside the panel's x range are dropped.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Mark {
    pub x: f64,
    pub label: String,
}

impl Mark {
    pub fn new(x: f64, label: impl Into<String>) -> Self {
        Mark { x, label: label.into() }
    }
}

/// One chart: its series share the x and y axes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Logarithmic y axis; non-positive y values are skipped.
    pub log_y: bool,
    pub series: Vec<Series>,
    pub marks: Vec<Mark>,
}

/// All panels in a grid of `columns` columns (0 is treated as 1), each panel 480x300 px, with a
/// shared page title on top. Never panics; the same input always gives the same bytes.
pub fn render_svg(title: &str, panels: &[Panel], columns: usize) -> String {
    let n = panels.len();
    let cols = columns.max(1).min(n.max(1));
    let rows = n.div_ceil(cols);
    let width = 2.0 * PAGE_MARGIN + cols as f64 * PANEL_W;
    let height = PAGE_TITLE_H + rows as f64 * PANEL_H + PAGE_MARGIN;

    let mut out = String::with_capacity(16 * 1024 + n * 8 * 1024);
    let (w, h) = (px(width), px(height));
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="Helvetica, Arial, sans-serif" font-size="11" fill="{TEXT_COLOUR}">"#
    );
    let _ = writeln!(out, "<title>{}</title>", escape(title));
    let _ = writeln!(out, r##"<rect width="{w}" height="{h}" fill="#fff"/>"##);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="27" text-anchor="middle" font-size="18" font-weight="bold">{}</text>"#,
        px(width / 2.0),
        escape(title)
    );
    for (i, panel) in panels.iter().enumerate() {
        let ox = PAGE_MARGIN + (i % cols) as f64 * PANEL_W;
        let oy = PAGE_TITLE_H + (i / cols) as f64 * PANEL_H;
        render_panel(&mut out, panel, ox, oy);
    }
    out.push_str("</svg>\n");
    out
}

/// Writes [`render_svg`] to `path` atomically: `path.tmp` in the same folder is written, flushed and
/// synced, then renamed over `path`, so a reader never sees a half-written file.
pub fn write_svg(path: &Path, title: &str, panels: &[Panel], columns: usize) -> io::Result<()> {
    let svg = render_svg(title, panels, columns);
    let Some(name) = path.file_name() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{}: not a file path", path.display())));
    };
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let written = (|| {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(svg.as_bytes())?;
        file.flush()?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io::Error::new(e.kind(), format!("{}: cannot write plot: {e}", path.display())));
    }
    // Make the rename itself durable (best effort; not every platform can open a folder).
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// A kept point: y already in axis space (log10 for log axes); `brk` = points were skipped before it.
#[derive(Debug, Clone, Copy)]
struct Pt {
    x: f64,
    y: f64,
    brk: bool,
}

/// Drops non-finite points (and non-positive y on log axes) and records where they were.
fn clean(points: &[(f64, f64)], log_y: bool) -> Vec<Pt> {
    let mut out = Vec::with_capacity(points.len());
    let mut skipped = false;
    for &(x, y) in points {
        if !x.is_finite() || !y.is_finite() || (log_y && y <= 0.0) {
            skipped = true;
            continue;
        }
        let y = if log_y { y.log10() } else { y };
        if !y.is_finite() {
            skipped = true;
            continue;
        }
        out.push(Pt { x, y, brk: skipped && !out.is_empty() });
        skipped = false;
    }
    out
}

/// Thins to at most `max` points: the points are split into `max / 2` buckets by position and each
/// bucket keeps its lowest and highest y (in their original order), so spikes survive. A bucket that
/// contained a break starts a new line.
fn thin(pts: Vec<Pt>, max: usize) -> Vec<Pt> {
    let n = pts.len();
    let buckets = (max / 2).max(1);
    if n <= max || n == 0 {
        return pts;
    }
    let mut out = Vec::with_capacity(2 * buckets);
    let mut start = 0;
    while start < n {
        let b = (start as u128 * buckets as u128 / n as u128) as usize;
        let mut end = start + 1;
        while end < n && (end as u128 * buckets as u128 / n as u128) as usize == b {
            end += 1;
        }
        let Some(chunk) = pts.get(start..end) else { break };
        let (mut lo, mut hi) = (0usize, 0usize);
        let mut brk = false;
        for (i, p) in chunk.iter().enumerate() {
            brk |= p.brk;
            if chunk.get(lo).is_some_and(|q| p.y < q.y) {
                lo = i;
            }
            if chunk.get(hi).is_some_and(|q| p.y > q.y) {
                hi = i;
            }
        }
        let (first, second) = if lo <= hi { (lo, hi) } else { (hi, lo) };
        if let Some(p) = chunk.get(first) {
            out.push(Pt { brk, ..*p });
        }
        if second != first {
            if let Some(p) = chunk.get(second) {
                out.push(Pt { brk: false, ..*p });
            }
        }
        start = end;
    }
    out
}

/// Position of `v` in [lo, hi] as 0..=1, without overflow for any finite inputs.
fn frac(v: f64, lo: f64, hi: f64) -> f64 {
    let span = hi / 2.0 - lo / 2.0;
    if span > 0.0 {
        ((v / 2.0 - lo / 2.0) / span).clamp(0.0, 1.0)
    } else {
        0.5
    }
}

/// A usable (lo < hi, finite) range from data bounds; `pad` = fraction of the span added each side.
fn axis_range(bounds: Option<(f64, f64)>, pad: f64, log: bool) -> (f64, f64) {
    let Some((lo, hi)) = bounds.filter(|(lo, hi)| lo.is_finite() && hi.is_finite() && lo <= hi) else {
        return (0.0, 1.0);
    };
    let half = hi / 2.0 - lo / 2.0;
    let scale = lo.abs().max(hi.abs());
    if half <= scale * 1e-12 || half < 1e-290 {
        // Constant (or numerically constant) data: open a range around it.
        let mid = lo / 2.0 + hi / 2.0;
        let d = if log {
            0.5
        } else if mid.abs() > 1e-200 {
            mid.abs() * 0.1
        } else {
            1.0
        };
        let (a, b) = (mid - d, mid + d);
        return if a.is_finite() && b.is_finite() && a < b { (a, b) } else { (lo.min(-1.0), hi.max(1.0)) };
    }
    let d = half * 2.0 * pad;
    let (a, b) = (lo - d, hi + d);
    if a.is_finite() && b.is_finite() {
        (a, b)
    } else {
        (lo, hi)
    }
}

/// Nice ticks (1/2/5 × 10^k steps, about 5 of them) within [lo, hi], and the step.
fn linear_ticks(lo: f64, hi: f64) -> (Vec<f64>, f64) {
    let raw = (hi / 2.0 - lo / 2.0) / 2.5;
    if !(raw.is_finite() && raw > 0.0) {
        return (vec![lo, hi], 1.0);
    }
    let mag = 10f64.powf(raw.log10().floor());
    if !(mag.is_finite() && mag > 0.0) {
        return (vec![lo, hi], raw);
    }
    let norm = raw / mag;
    let m = if norm < 1.5 {
        1.0
    } else if norm < 3.0 {
        2.0
    } else if norm < 7.0 {
        5.0
    } else {
        10.0
    };
    let step = m * mag;
    let start = (lo / step).ceil() * step;
    if !(step.is_finite() && start.is_finite()) {
        return (vec![lo, hi], raw);
    }
    let mut ticks = Vec::new();
    for i in 0..16 {
        let v = start + i as f64 * step;
        if !v.is_finite() || v > hi + step * 1e-6 {
            break;
        }
        ticks.push(if v.abs() < step * 1e-6 { 0.0 } else { v });
    }
    (ticks, step)
}

/// Compact labels for ticks `step` apart: plain (`3000`, `0.25`), with a suffix (`12k`, `1.5M`), or
/// in exponent form (`1.2e-4`) for very small or very large values; trailing zeros are trimmed.
fn tick_labels(ticks: &[f64], step: f64) -> Vec<String> {
    let max_abs = ticks.iter().fold(0.0f64, |m, t| m.max(t.abs()));
    let step = if step.is_finite() && step > 0.0 { step } else { max_abs.max(1.0) };
    if !(1e-3..1e15).contains(&max_abs) {
        return ticks.iter().map(|&t| if t == 0.0 { "0".to_string() } else { exp_label(t, step) }).collect();
    }
    let (unit, suffix) = if max_abs >= 1e12 {
        (1e12, "T")
    } else if max_abs >= 1e9 {
        (1e9, "G")
    } else if max_abs >= 1e6 {
        (1e6, "M")
    } else if max_abs >= 1e4 {
        (1e3, "k")
    } else {
        (1.0, "")
    };
    let decimals = (-(step / unit).log10() - 1e-9).ceil().clamp(0.0, 6.0) as usize;
    ticks
        .iter()
        .map(|&t| {
            let s = format!("{:.*}", decimals, t / unit);
            let s = if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.') } else { &s };
            if s.trim_start_matches(['-', '0']).is_empty() {
                "0".to_string()
            } else {
                format!("{s}{suffix}")
            }
        })
        .collect()
}

/// `t` in exponent form with as many mantissa digits as `step` needs, trailing zeros trimmed.
fn exp_label(t: f64, step: f64) -> String {
    let e = t.abs().log10().floor();
    let se = step.log10().floor();
    let decimals = if (e - se).is_finite() { (e - se).clamp(0.0, 6.0) as usize } else { 0 };
    trim_exp(&format!("{:.*e}", decimals, t))
}

/// `1.50e-4` -> `1.5e-4`, `2.0e3` -> `2e3`.
fn trim_exp(s: &str) -> String {
    match s.split_once('e') {
        Some((m, e)) if m.contains('.') => format!("{}e{e}", m.trim_end_matches('0').trim_end_matches('.')),
        _ => s.to_string(),
    }
}

/// A value for a label outside the axes (e.g. a mark's x in its tooltip).
fn value_label(v: f64) -> String {
    if !v.is_finite() {
        return "?".to_string();
    }
    if v == v.trunc() && v.abs() < 1e15 {
        return format!("{v:.0}");
    }
    let a = v.abs();
    if (1e-3..1e6).contains(&a) {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        trim_exp(&format!("{v:.3e}"))
    }
}

/// Ticks on a log axis whose range [lo, hi] is in log10 space: (position in log10 space, label).
fn log_ticks(lo: f64, hi: f64) -> Vec<(f64, String)> {
    let (a, b) = (lo.ceil(), hi.floor());
    if b - a >= 2.0 {
        let powers = b - a + 1.0;
        let step = (powers / 7.0).ceil().max(1.0);
        let start = (a / step).ceil() * step;
        return (0..16)
            .map(|i| start + i as f64 * step)
            .take_while(|&k| k <= b)
            .map(|k| (k, format!("1e{:.0}", k + 0.0)))
            .collect();
    }
    // Fewer than three powers of ten inside: 1/2/5 × 10^k.
    let mut ticks = Vec::new();
    let mut k = lo.floor();
    while k <= hi.ceil() && ticks.len() < 16 {
        for m in [1.0f64, 2.0, 5.0] {
            let pos = k + m.log10();
            if pos >= lo - 1e-9 && pos <= hi + 1e-9 {
                ticks.push((pos, format!("{m:.0}e{:.0}", k + 0.0)));
            }
        }
        k += 1.0;
    }
    if ticks.len() >= 3 {
        return ticks;
    }
    // Narrower still: linear ticks on the values, placed on the log scale.
    let (vlo, vhi) = (10f64.powf(lo), 10f64.powf(hi));
    let (vals, step) = linear_ticks(vlo, vhi);
    let vals: Vec<f64> = vals.into_iter().filter(|v| *v > 0.0).collect();
    let labels = tick_labels(&vals, step);
    vals.iter().zip(labels).map(|(v, l)| (v.log10(), l)).filter(|(p, _)| p.is_finite()).collect()
}

/// Escapes XML special characters, and replaces characters XML 1.0 does not allow (control
/// characters, U+FFFE, U+FFFF) so that the file always parses.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(' '),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// At most `max` characters of `s` (with an ellipsis when cut), escaped.
fn short(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        escape(s)
    } else {
        let mut cut: String = s.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        escape(&cut)
    }
}

/// A pixel coordinate with at most one decimal (`12`, `12.5`); never `NaN`/`inf`.
fn px(v: f64) -> String {
    if !v.is_finite() {
        return "0".to_string();
    }
    let s = format!("{:.1}", v);
    let s = s.strip_suffix(".0").unwrap_or(&s);
    if s == "-0" {
        "0".to_string()
    } else {
        s.to_string()
    }
}

fn render_panel(out: &mut String, panel: &Panel, ox: f64, oy: f64) {
    let log = panel.log_y;
    let prepared: Vec<(Vec<Pt>, Style)> = panel.series.iter().map(|s| (clean(&s.points, log), s.style)).collect();

    // Data bounds (before thinning, so that no extreme is lost).
    let mut xb: Option<(f64, f64)> = None;
    let mut yb: Option<(f64, f64)> = None;
    for p in prepared.iter().flat_map(|(pts, _)| pts) {
        xb = Some(xb.map_or((p.x, p.x), |(a, b)| (a.min(p.x), b.max(p.x))));
        yb = Some(yb.map_or((p.y, p.y), |(a, b)| (a.min(p.y), b.max(p.y))));
    }
    let has_data = xb.is_some();
    if xb.is_none() {
        for m in panel.marks.iter().filter(|m| m.x.is_finite()) {
            xb = Some(xb.map_or((m.x, m.x), |(a, b)| (a.min(m.x), b.max(m.x))));
        }
    }
    let (x0, x1) = axis_range(xb, 0.0, false);
    let (y0, y1) = axis_range(yb, 0.05, log);

    let (l, r, t, b) = (PLOT_LEFT, PLOT_RIGHT, PLOT_TOP, PLOT_BOTTOM);
    let sx = |x: f64| l + frac(x, x0, x1) * (r - l);
    let sy = |y: f64| b - frac(y, y0, y1) * (b - t);

    let _ = writeln!(out, r#"<g transform="translate({},{})">"#, px(ox), px(oy));
    let _ = writeln!(
        out,
        r##"<rect x="4" y="4" width="{}" height="{}" rx="4" fill="#fcfcfc" stroke="#ddd"/>"##,
        px(PANEL_W - 8.0),
        px(PANEL_H - 8.0)
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="13" font-weight="bold">{}</text>"#,
        px((l + r) / 2.0),
        short(&panel.title, 64)
    );

    // Ticks and grid.
    let (xt, xstep) = linear_ticks(x0, x1);
    let x_ticks: Vec<(f64, String)> = xt.iter().copied().zip(tick_labels(&xt, xstep)).collect();
    let y_ticks: Vec<(f64, String)> = if log {
        log_ticks(y0, y1)
    } else {
        let (yt, ystep) = linear_ticks(y0, y1);
        yt.iter().copied().zip(tick_labels(&yt, ystep)).collect()
    };
    let mut grid = String::new();
    for (v, _) in &x_ticks {
        let _ = write!(grid, "M{} {}V{}", px(sx(*v)), px(t), px(b));
    }
    for (v, _) in &y_ticks {
        let _ = write!(grid, "M{} {}H{}", px(l), px(sy(*v)), px(r));
    }
    if !grid.is_empty() {
        let _ = writeln!(out, r#"<path d="{grid}" stroke="{GRID_COLOUR}" stroke-width="1" fill="none"/>"#);
    }
    let _ = writeln!(out, r#"<g font-size="10" text-anchor="middle">"#);
    for (v, label) in &x_ticks {
        let _ = writeln!(out, r#"<text x="{}" y="{}">{}</text>"#, px(sx(*v)), px(b + 14.0), escape(label));
    }
    out.push_str("</g>\n");
    let _ = writeln!(out, r#"<g font-size="10" text-anchor="end">"#);
    for (v, label) in &y_ticks {
        let _ = writeln!(out, r#"<text x="{}" y="{}">{}</text>"#, px(l - 5.0), px(sy(*v) + 3.5), escape(label));
    }
    out.push_str("</g>\n");
    if !panel.x_label.is_empty() {
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            px((l + r) / 2.0),
            px(b + 32.0),
            short(&panel.x_label, 70)
        );
    }
    if !panel.y_label.is_empty() {
        let _ = writeln!(
            out,
            r#"<text transform="translate(16,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
            px((t + b) / 2.0),
            short(&panel.y_label, 40)
        );
    }

    // Series.
    for (i, (pts, style)) in prepared.into_iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let pts = thin(pts, MAX_DRAWN_POINTS);
        match style {
            Style::Line => draw_line(out, &pts, colour, &sx, &sy),
            Style::Dots => draw_dots(out, &pts, colour, &sx, &sy),
        }
    }
    if !has_data {
        let _ = writeln!(
            out,
            r##"<text x="{}" y="{}" text-anchor="middle" fill="#999">no data</text>"##,
            px((l + r) / 2.0),
            px((t + b) / 2.0)
        );
    }

    // Marks (outside the x range: dropped).
    let span_tol = (x1 / 2.0 - x0 / 2.0) * 1e-9;
    let visible: Vec<&Mark> =
        panel.marks.iter().filter(|m| m.x.is_finite() && m.x >= x0 - span_tol && m.x <= x1 + span_tol).collect();
    let stride = visible.len().div_ceil(MAX_DRAWN_MARKS).max(1);
    for m in visible.iter().step_by(stride) {
        let x = px(sx(m.x));
        let _ = writeln!(
            out,
            r#"<line class="mark" x1="{x}" y1="{}" x2="{x}" y2="{}" stroke="{MARK_COLOUR}" stroke-width="1" stroke-dasharray="4 3"><title>{} (x={})</title></line>"#,
            px(t),
            px(b),
            escape(&m.label),
            escape(&value_label(m.x))
        );
        if !m.label.is_empty() {
            let _ = writeln!(
                out,
                r#"<text transform="translate({},{}) rotate(-90)" text-anchor="end" font-size="9" fill="{MARK_COLOUR}">{}</text>"#,
                px(sx(m.x) + 10.0),
                px(t + 4.0),
                short(&m.label, 24)
            );
        }
    }

    // Plot frame on top of the data.
    let _ = writeln!(
        out,
        r##"<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#999"/>"##,
        px(l),
        px(t),
        px(r - l),
        px(b - t)
    );

    if panel.series.len() > 1 {
        draw_legend(out, &panel.series);
    }
    out.push_str("</g>\n");
}

fn draw_line(out: &mut String, pts: &[Pt], colour: &str, sx: &dyn Fn(f64) -> f64, sy: &dyn Fn(f64) -> f64) {
    let mut run: Vec<String> = Vec::new();
    let flush = |out: &mut String, run: &mut Vec<String>| {
        match run.len() {
            0 => {}
            1 => {
                if let Some((x, y)) = run.first().and_then(|p| p.split_once(',')) {
                    let _ = writeln!(out, r#"<circle cx="{x}" cy="{y}" r="1.5" fill="{colour}"/>"#);
                }
            }
            _ => {
                let _ = writeln!(
                    out,
                    r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="1.5" stroke-linejoin="round"/>"#,
                    run.join(" ")
                );
            }
        }
        run.clear();
    };
    for p in pts {
        if p.brk {
            flush(out, &mut run);
        }
        let xy = format!("{},{}", px(sx(p.x)), px(sy(p.y)));
        if run.last() != Some(&xy) {
            run.push(xy);
        }
    }
    flush(out, &mut run);
}

fn draw_dots(out: &mut String, pts: &[Pt], colour: &str, sx: &dyn Fn(f64) -> f64, sy: &dyn Fn(f64) -> f64) {
    if pts.is_empty() {
        return;
    }
    let _ = writeln!(out, r#"<g fill="{colour}">"#);
    let mut last = String::new();
    for p in pts {
        let (x, y) = (px(sx(p.x)), px(sy(p.y)));
        let key = format!("{x},{y}");
        if key != last {
            let _ = writeln!(out, r#"<circle cx="{x}" cy="{y}" r="2.5"/>"#);
            last = key;
        }
    }
    out.push_str("</g>\n");
}

fn draw_legend(out: &mut String, series: &[Series]) {
    let shown = series.len().min(MAX_LEGEND_ROWS);
    let more = series.len() - shown;
    let rows = shown + usize::from(more > 0);
    let names: Vec<String> = series.iter().take(shown).map(|s| short(&s.name, 28)).collect();
    let widest = series.iter().take(shown).map(|s| s.name.chars().count().min(28)).max().unwrap_or(0).max(8);
    let w = 30.0 + widest as f64 * 6.0;
    let h = 8.0 + rows as f64 * 14.0;
    let x = PLOT_RIGHT - 6.0 - w;
    let y = PLOT_TOP + 6.0;
    let _ = writeln!(out, r#"<g class="legend" font-size="10">"#);
    let _ = writeln!(
        out,
        r##"<rect x="{}" y="{}" width="{}" height="{}" fill="#fff" fill-opacity="0.85" stroke="#ccc"/>"##,
        px(x),
        px(y),
        px(w),
        px(h)
    );
    for (i, (s, name)) in series.iter().zip(names).enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let cy = y + 11.0 + i as f64 * 14.0;
        match s.style {
            Style::Line => {
                let _ = writeln!(
                    out,
                    r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{colour}" stroke-width="2"/>"#,
                    px(x + 6.0),
                    px(cy),
                    px(x + 22.0),
                    px(cy)
                );
            }
            Style::Dots => {
                let _ = writeln!(out, r#"<circle cx="{}" cy="{}" r="3" fill="{colour}"/>"#, px(x + 14.0), px(cy));
            }
        }
        let _ = writeln!(out, r#"<text x="{}" y="{}">{name}</text>"#, px(x + 26.0), px(cy + 3.5));
    }
    if more > 0 {
        let cy = y + 11.0 + shown as f64 * 14.0;
        let _ = writeln!(out, r##"<text x="{}" y="{}" fill="#777">+{more} more</text>"##, px(x + 26.0), px(cy + 3.5));
    }
    out.push_str("</g>\n");
}

#[cfg(test)]
mod tests;
