use super::*;

/// Checks that every element is closed in order; returns the number of elements.
fn check_balanced(svg: &str) -> usize {
    let mut stack: Vec<String> = Vec::new();
    let mut count = 0;
    let mut rest = svg;
    while let Some(open) = rest.find('<') {
        let after = &rest[open + 1..];
        let close = after.find('>').expect("unterminated tag");
        let tag = &after[..close];
        assert!(!tag.contains('<'), "stray '<' inside tag {tag:?}");
        if let Some(name) = tag.strip_prefix('/') {
            let top = stack.pop().unwrap_or_else(|| panic!("closing </{name}> with nothing open"));
            assert_eq!(top, name.trim(), "mismatched close");
        } else if !tag.ends_with('/') {
            stack.push(tag.split_whitespace().next().unwrap_or("").to_string());
            count += 1;
        } else {
            count += 1;
        }
        rest = &after[close + 1..];
    }
    assert!(stack.is_empty(), "unclosed elements: {stack:?}");
    // No stray '>' or '&' outside entities in text either.
    for (i, _) in svg.match_indices('&') {
        let tail = &svg[i..];
        let ok = ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"].iter().any(|e| tail.starts_with(e));
        assert!(ok, "raw '&' at {i}: {:?}", &tail[..tail.len().min(20)]);
    }
    count
}

fn assert_well_formed(svg: &str) {
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
    assert!(svg.ends_with("</svg>\n"));
    check_balanced(svg);
    assert!(!svg.contains("NaN"), "NaN in output");
    assert!(!svg.contains("inf"), "inf in output");
}

/// Every drawn data point: vertices of polylines plus circles (legend circles excluded by callers).
fn polyline_points(svg: &str) -> usize {
    svg.match_indices("<polyline points=\"")
        .map(|(i, m)| {
            let s = &svg[i + m.len()..];
            let end = s.find('"').unwrap();
            s[..end].split(' ').count()
        })
        .sum()
}

fn polyline_ys(svg: &str) -> Vec<f64> {
    let mut ys = Vec::new();
    for (i, m) in svg.match_indices("<polyline points=\"") {
        let s = &svg[i + m.len()..];
        let end = s.find('"').unwrap();
        for pair in s[..end].split(' ') {
            let (_, y) = pair.split_once(',').unwrap();
            ys.push(y.parse::<f64>().unwrap());
        }
    }
    ys
}

fn loss_panel() -> Panel {
    let train: Vec<(f64, f64)> = (0..500).map(|s| (s as f64, 4.0 * (-(s as f64) / 200.0).exp() + 2.0)).collect();
    let val: Vec<(f64, f64)> =
        (0..500).step_by(100).map(|s| (s as f64, 4.1 * (-(s as f64) / 200.0).exp() + 2.1)).collect();
    Panel {
        title: "loss <train> & \"val\"".into(),
        x_label: "step".into(),
        y_label: "loss 'nats'".into(),
        log_y: false,
        series: vec![Series::line("train", train), Series::dots("val <sparse>", val)],
        marks: vec![Mark::new(250.0, "rollback")],
    }
}

#[test]
fn structure_and_escaping() {
    let svg = render_svg("run <7> & \"friends\"", &[loss_panel()], 2);
    assert_well_formed(&svg);
    assert!(svg.contains("run &lt;7&gt; &amp; &quot;friends&quot;"));
    assert!(svg.contains("loss &lt;train&gt; &amp; &quot;val&quot;"));
    assert!(svg.contains("loss &apos;nats&apos;"));
    assert!(svg.contains("val &lt;sparse&gt;"));
    assert!(svg.contains("class=\"legend\""), "two series get a legend");
    assert!(!svg.contains("<train>"));
    // One panel with columns=2: the page is one panel wide.
    assert!(svg.contains("width=\"500\" height=\"350\""), "{}", &svg[..200]);
}

#[test]
fn single_series_has_no_legend() {
    let mut p = loss_panel();
    p.series.truncate(1);
    let svg = render_svg("t", &[p], 1);
    assert_well_formed(&svg);
    assert!(!svg.contains("class=\"legend\""));
}

#[test]
fn invalid_xml_chars_replaced() {
    let p = Panel { title: "a\u{0}b\u{1b}c\u{ffff}".into(), ..Panel::default() };
    let svg = render_svg("x\u{7}", &[p], 1);
    assert_well_formed(&svg);
    assert!(!svg.chars().any(|c| (c as u32) < 0x20 && c != '\n'));
    assert!(!svg.contains('\u{ffff}'));
}

#[test]
fn nan_and_inf_are_skipped_and_break_the_line() {
    let pts = vec![
        (0.0, 1.0),
        (1.0, 2.0),
        (2.0, f64::NAN),
        (3.0, f64::INFINITY),
        (4.0, 3.0),
        (5.0, 2.5),
        (f64::NEG_INFINITY, 1.0),
        (f64::NAN, f64::NAN),
    ];
    let p = Panel { title: "loss".into(), series: vec![Series::line("loss", pts)], ..Panel::default() };
    let svg = render_svg("nan", &[p], 1);
    assert_well_formed(&svg);
    assert_eq!(svg.matches("<polyline").count(), 2, "line broken at the skipped points");
    assert_eq!(polyline_points(&svg), 4);

    // An isolated point between NaNs is still drawn (as a dot).
    let pts = vec![(0.0, 1.0), (1.0, 2.0), (2.0, f64::NAN), (3.0, 1.5), (4.0, f64::NAN), (5.0, 1.0), (6.0, 1.2)];
    let p = Panel { series: vec![Series::line("l", pts)], ..Panel::default() };
    let svg = render_svg("nan", &[p], 1);
    assert_well_formed(&svg);
    assert_eq!(svg.matches("<polyline").count(), 2);
    assert_eq!(svg.matches("<circle").count(), 1);

    // All-NaN series: empty plot, no crash.
    let p = Panel { series: vec![Series::line("l", vec![(f64::NAN, 1.0); 10])], ..Panel::default() };
    let svg = render_svg("nan", &[p], 1);
    assert_well_formed(&svg);
    assert!(svg.contains("no data"));
}

#[test]
fn log_axis_with_zeros_and_negatives() {
    let pts: Vec<(f64, f64)> =
        (0..200).map(|i| (i as f64, if i % 10 == 0 { 0.0 } else { 10f64.powi(i % 7 - 3) })).collect();
    let mut with_neg = pts.clone();
    with_neg.push((300.0, -5.0));
    let p = Panel {
        title: "loss scale".into(),
        log_y: true,
        series: vec![Series::line("scale", with_neg)],
        ..Panel::default()
    };
    let svg = render_svg("log", &[p], 1);
    assert_well_formed(&svg);
    assert!(svg.contains(">1e-3<") && svg.contains(">1e3<"), "power-of-ten labels");
    assert!(!svg.contains("no data"));

    // Only zeros: nothing to draw, still renders.
    let p = Panel { log_y: true, series: vec![Series::line("z", vec![(0.0, 0.0), (1.0, 0.0)])], ..Panel::default() };
    let svg = render_svg("log", &[p], 1);
    assert_well_formed(&svg);
    assert!(svg.contains("no data"));

    // Narrow log range: 1/2/5 ticks or linear ticks, never empty.
    for (lo, hi) in [(2.0, 2.5), (1.0, 30.0), (7.0, 7.0), (0.9, 1.1)] {
        let p = Panel { log_y: true, series: vec![Series::line("n", vec![(0.0, lo), (1.0, hi)])], ..Panel::default() };
        let svg = render_svg("log", &[p], 1);
        assert_well_formed(&svg);
        let (a, b) = axis_range(Some((f64::log10(lo), f64::log10(hi))), 0.05, true);
        assert!(log_ticks(a, b).len() >= 2, "{lo}..{hi}: {:?}", log_ticks(a, b));
    }
}

#[test]
fn degenerate_panels_render() {
    let empty = Panel { title: "empty".into(), ..Panel::default() };
    let empty_series = Panel { series: vec![Series::line("a", vec![]), Series::dots("b", vec![])], ..Panel::default() };
    let single = Panel { series: vec![Series::line("one", vec![(100.0, 3.5)])], ..Panel::default() };
    let constant =
        Panel { series: vec![Series::line("c", (0..50).map(|i| (i as f64, 0.0)).collect())], ..Panel::default() };
    let same_x = Panel { series: vec![Series::dots("c", vec![(5.0, 1.0), (5.0, 2.0)])], ..Panel::default() };
    let huge = Panel {
        series: vec![Series::line(
            "h",
            vec![(-f64::MAX, -f64::MAX), (0.0, f64::MIN_POSITIVE), (f64::MAX, f64::MAX), (1.0, 5e-324)],
        )],
        marks: vec![Mark::new(f64::MAX, "end"), Mark::new(-f64::MAX, "start")],
        ..Panel::default()
    };
    let tiny = Panel {
        log_y: true,
        series: vec![Series::line("t", vec![(0.0, 5e-324), (1.0, f64::MAX), (2.0, 1e-300)])],
        ..Panel::default()
    };
    let marks_only = Panel { marks: vec![Mark::new(10.0, "a"), Mark::new(20.0, "b")], ..Panel::default() };
    let panels = vec![empty, empty_series, single, constant, same_x, huge, tiny, marks_only];
    for columns in [0, 1, 3, 100, usize::MAX] {
        let svg = render_svg("", &panels, columns);
        assert_well_formed(&svg);
        assert_eq!(svg.matches("<g transform=\"translate(").count(), panels.len());
    }
    let svg = render_svg("no panels", &[], 0);
    assert_well_formed(&svg);
    assert!(svg.contains("no panels"));
    // Marks-only panel takes its x range from the marks.
    let svg = render_svg("m", &panels[7..], 1);
    assert_eq!(svg.matches("class=\"mark\"").count(), 2);
}

#[test]
fn grid_layout() {
    let panels = vec![loss_panel(); 5];
    let svg = render_svg("grid", &panels, 2);
    assert_well_formed(&svg);
    // 2 columns, 3 rows.
    assert!(svg.contains("width=\"980\" height=\"950\""), "{}", &svg[..200]);
    assert!(svg.contains("translate(490,340)") && svg.contains("translate(10,640)"));
    assert!(!svg.contains("translate(490,640)"));
}

#[test]
fn marks_drawn_inside_range_only() {
    let mut p = loss_panel();
    p.marks = vec![
        Mark::new(0.0, "first"),
        Mark::new(120.0, "skip step"),
        Mark::new(499.0, "last"),
        Mark::new(10_000.0, "outside"),
        Mark::new(-3.0, "before"),
        Mark::new(f64::NAN, "nan"),
        Mark::new(200.0, "a very long label that goes on and on & on <forever>"),
    ];
    let svg = render_svg("marks", &[p], 1);
    assert_well_formed(&svg);
    assert_eq!(svg.matches("class=\"mark\"").count(), 4);
    assert!(!svg.contains("outside") && !svg.contains("before"));
    assert!(svg.contains("stroke-dasharray"));
    assert!(
        svg.contains("a very long label that goes on and on &amp; on &lt;forever&gt; (x=200)"),
        "full label in tooltip"
    );

    // Very many marks are strided.
    let p = Panel {
        series: vec![Series::line("l", (0..100_000).map(|i| (i as f64, 1.0)).collect())],
        marks: (0..100_000).map(|i| Mark::new(i as f64, "s")).collect(),
        ..Panel::default()
    };
    let svg = render_svg("marks", &[p], 1);
    assert_well_formed(&svg);
    let n = svg.matches("class=\"mark\"").count();
    assert!(n > 0 && n <= MAX_DRAWN_MARKS, "{n}");
}

#[test]
fn thinning_caps_points_and_keeps_spikes() {
    let mut pts: Vec<(f64, f64)> = (0..100_000).map(|i| (i as f64, 1.0 + (i as f64 * 0.37).sin() * 0.01)).collect();
    pts[54_321].1 = 50.0; // a spike
    pts[70_000].1 = f64::NAN;
    let p = Panel { series: vec![Series::line("loss", pts.clone())], ..Panel::default() };
    let svg = render_svg("big", &[p], 1);
    assert_well_formed(&svg);
    let n = polyline_points(&svg);
    assert!(n > 100 && n <= MAX_DRAWN_POINTS, "{n} points drawn");
    let top = polyline_ys(&svg).into_iter().fold(f64::INFINITY, f64::min);
    assert!(top < PLOT_TOP + 15.0, "spike kept: top y {top}");
    assert!(svg.len() < 200_000, "{} bytes", svg.len());

    let p = Panel { series: vec![Series::dots("val", pts)], ..Panel::default() };
    let svg = render_svg("big", &[p], 1);
    assert_well_formed(&svg);
    let n = svg.matches("<circle").count();
    assert!(n > 100 && n <= MAX_DRAWN_POINTS, "{n} dots drawn");
}

#[test]
fn thin_unit() {
    let pts: Vec<Pt> = (0..10_001).map(|i| Pt { x: i as f64, y: (i % 7) as f64, brk: i == 5000 }).collect();
    let out = thin(pts.clone(), 100);
    assert!(out.len() <= 100);
    assert!(out.iter().any(|p| p.brk), "break survives thinning");
    assert!(out.windows(2).all(|w| w[0].x < w[1].x), "order kept");
    assert_eq!(thin(pts[..50].to_vec(), 100).len(), 50);
    assert!(thin(Vec::new(), 100).is_empty());
    assert!(thin(pts, 0).len() <= 2);
}

#[test]
fn deterministic() {
    let panels = vec![loss_panel(), Panel { log_y: true, ..loss_panel() }];
    let a = render_svg("d", &panels, 2);
    let b = render_svg("d", &panels.clone(), 2);
    assert_eq!(a, b);
}

#[test]
fn pixel_numbers_are_short() {
    let svg = render_svg("p", &[loss_panel()], 1);
    for attr in [" x=\"", " y=\"", " cx=\"", " cy=\"", " width=\""] {
        for (i, m) in svg.match_indices(attr) {
            let v = &svg[i + m.len()..];
            let v = &v[..v.find('"').unwrap()];
            if let Some((_, dec)) = v.split_once('.') {
                assert!(dec.len() <= 1, "{attr}{v}");
            }
        }
    }
    assert_eq!(px(12.0), "12");
    assert_eq!(px(12.25), "12.2");
    assert_eq!(px(-0.01), "0");
    assert_eq!(px(f64::NAN), "0");
}

#[test]
fn nice_ticks_and_labels() {
    let (t, step) = linear_ticks(0.0, 100.0);
    assert_eq!(t, vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
    assert_eq!(tick_labels(&t, step), ["0", "20", "40", "60", "80", "100"]);

    let (t, step) = linear_ticks(0.0, 15_000.0);
    assert_eq!(tick_labels(&t, step), ["0", "5k", "10k", "15k"]);

    let (t, step) = linear_ticks(0.0, 3000.0);
    assert_eq!(tick_labels(&t, step).last().map(String::as_str), Some("3000"));

    let (t, step) = linear_ticks(11_000.0, 13_000.0);
    assert!(tick_labels(&t, step).contains(&"12k".to_string()), "{:?}", tick_labels(&t, step));

    let (t, step) = linear_ticks(1.0e-4, 2.0e-4);
    let labels = tick_labels(&t, step);
    assert!(labels.contains(&"1.2e-4".to_string()), "{labels:?}");

    let (t, step) = linear_ticks(-0.3, 0.3);
    let labels = tick_labels(&t, step);
    assert!(labels.contains(&"0".to_string()) && labels.contains(&"-0.2".to_string()), "{labels:?}");

    let (t, step) = linear_ticks(0.0, 2.5e6);
    assert_eq!(tick_labels(&t, step), ["0", "0.5M", "1M", "1.5M", "2M", "2.5M"]);

    for (lo, hi) in [(0.0, 1.0), (-7.3, 1234.5), (1e-9, 3e-9), (-1e300, 1e300), (3.0, 3.0000001)] {
        let (t, _) = linear_ticks(lo, hi);
        assert!((2..=12).contains(&t.len()), "{lo}..{hi}: {t:?}");
        assert!(t.iter().all(|v| *v >= lo - 1e-9 * (hi - lo) && *v <= hi + 1e-9 * (hi - lo)));
    }

    let ticks = log_ticks(-3.2, 3.1);
    let labels: Vec<&str> = ticks.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(labels, ["1e-3", "1e-2", "1e-1", "1e0", "1e1", "1e2", "1e3"]);
    let ticks = log_ticks(-3.2, 6.1);
    let labels: Vec<&str> = ticks.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(labels, ["1e-2", "1e0", "1e2", "1e4", "1e6"], "every other decade");
    let ticks = log_ticks(-300.0, 300.0);
    assert!((2..=10).contains(&ticks.len()), "{ticks:?}");
    let ticks = log_ticks(0.2, 1.2);
    let labels: Vec<&str> = ticks.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(labels, ["2e0", "5e0", "1e1"]);
}

#[test]
fn write_svg_atomically() {
    let dir = std::env::temp_dir().join(format!("glm-plot-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("train.svg");
    let panels = vec![loss_panel()];
    write_svg(&path, "run", &panels, 2).unwrap();
    let back = std::fs::read_to_string(&path).unwrap();
    assert_eq!(back, render_svg("run", &panels, 2));
    assert!(!dir.join("train.svg.tmp").exists());
    // Overwrite in place.
    write_svg(&path, "run 2", &[], 1).unwrap();
    assert!(std::fs::read_to_string(&path).unwrap().contains("run 2"));
    // Not a file path / missing folder: errors, no panic.
    assert!(write_svg(Path::new("/"), "x", &[], 1).is_err());
    assert!(write_svg(&dir.join("missing").join("x.svg"), "x", &[], 1).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
