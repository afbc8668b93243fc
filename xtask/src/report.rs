//! `cargo xtask bench --compare`: turns the measurements of the comparison benchmarks into the
//! tables and SVG plots of `BENCHMARKS.md`.
//!
//! The benchmark binaries write JSON lines, one measurement each:
//! `{"part", "table", "row", "size", "round", "metric", "value"}`. Rows named `none` (kernel
//! path) or `direct` (proxy path) are the baseline of their table and are measured in every
//! round; every other row is reported as its median over the rounds and as the **median of its
//! per-round ratios to the baseline of the same round**, with the min–max spread of those ratios
//! (the machine is shared and noisy: only same-round ratios are comparable).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use plotters::prelude::*;

/// One measurement, as the benchmark binaries write it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Sample {
    /// `l4`, `proxy`, `scale`.
    pub part: String,
    /// The table (scenario) id, e.g. `connect-rotating`, `tls-keepalive`.
    pub table: String,
    /// The configuration measured (`none`, `ours`, `nft-set`, `direct`, `nginx`, ...).
    pub row: String,
    /// Rule count, workload count or connection count, when the table has sizes.
    pub size: Option<u64>,
    /// The interleaved round.
    pub round: u32,
    /// The metric name; its suffix gives the unit (`_ns`, `_us`, `_ms`, `_per_s`, `bytes`).
    pub metric: String,
    /// The value.
    pub value: f64,
}

/// Reads every JSON-lines file given (missing files are skipped with a note).
pub fn load(paths: &[PathBuf]) -> anyhow::Result<Vec<Sample>> {
    let mut out = Vec::new();
    for p in paths {
        let text = match std::fs::read_to_string(p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("[xtask] {}: not found, skipped", p.display());
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        };
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let s: Sample = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a measurement", p.display(), i + 1))?;
            out.push(s);
        }
    }
    Ok(out)
}

fn is_baseline(row: &str) -> bool {
    row == "none" || row == "direct"
}

/// Whether a larger value is better (rates); otherwise smaller is (times, CPU, bytes).
fn higher_is_better(metric: &str) -> bool {
    metric.ends_with("_per_s")
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Median and spread of one (row, size, metric) cell.
#[derive(Debug, Clone, Copy)]
struct Cell {
    value: f64,
    ratio: Option<(f64, f64, f64)>,
    added: Option<f64>,
    rounds: usize,
}

type Key = (String, Option<u64>);

/// One table: metrics in first-seen order, rows in first-seen order, cells.
struct Table {
    metrics: Vec<String>,
    rows: Vec<Key>,
    cells: BTreeMap<(Key, String), Cell>,
}

fn table(samples: &[&Sample]) -> Table {
    let mut metrics: Vec<String> = Vec::new();
    let mut rows: Vec<Key> = Vec::new();
    for s in samples {
        if !metrics.contains(&s.metric) {
            metrics.push(s.metric.clone());
        }
        let k = (s.row.clone(), s.size);
        if !rows.contains(&k) {
            rows.push(k);
        }
    }
    // Baseline rows first, then by row name's first appearance, sizes ascending.
    let order: Vec<String> = rows
        .iter()
        .map(|(r, _)| r.clone())
        .fold(Vec::new(), |mut v, r| {
            if !v.contains(&r) {
                v.push(r);
            }
            v
        });
    rows.sort_by_key(|(r, s)| (!is_baseline(r), order.iter().position(|o| o == r), *s));
    // Baseline value of each (metric, round).
    let mut base: BTreeMap<(String, u32), f64> = BTreeMap::new();
    for s in samples.iter().filter(|s| is_baseline(&s.row)) {
        base.insert((s.metric.clone(), s.round), s.value);
    }
    let mut cells = BTreeMap::new();
    for k in &rows {
        for m in &metrics {
            let mine: Vec<&&Sample> = samples
                .iter()
                .filter(|s| s.row == k.0 && s.size == k.1 && &s.metric == m)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let mut values: Vec<f64> = mine.iter().map(|s| s.value).collect();
            let mut ratios: Vec<f64> = Vec::new();
            let mut added: Vec<f64> = Vec::new();
            if !is_baseline(&k.0) {
                for s in &mine {
                    if let Some(b) = base.get(&(m.clone(), s.round)) {
                        if *b != 0.0 {
                            ratios.push(s.value / b);
                        }
                        added.push(s.value - b);
                    }
                }
            }
            let rounds = values.len();
            let value = median(&mut values).unwrap_or(f64::NAN);
            let ratio = median(&mut ratios.clone()).map(|r| {
                let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
                let max = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                (r, min, max)
            });
            let added = median(&mut added);
            cells.insert(
                (k.clone(), m.clone()),
                Cell {
                    value,
                    ratio,
                    added,
                    rounds,
                },
            );
        }
    }
    Table {
        metrics,
        rows,
        cells,
    }
}

/// Whether a metric gets a plot (the tables keep every metric; plots only the telling ones).
fn plotted(metric: &str) -> bool {
    let table_only = [
        "conn_per_s",
        "retire_ms",
        "free_ms",
        "replace_compile_ms",
        "replace_p99_connect_us",
    ]
    .contains(&metric);
    let kernel_p99 = metric.starts_with("p99") && metric.ends_with("_ns");
    !(table_only || kernel_p99)
}

/// A number with a sensible precision for its size.
fn num(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A table id in words.
fn table_words(id: &str) -> &str {
    match id {
        "connect-fixed" => "connect(): one fixed destination",
        "connect-rotating" => "connect(): destinations rotating",
        "deny" => "connect() to a denied destination",
        "load" => "loading and replacing the full rule set",
        "memory" => "memory of the rule set",
        "bpf" => "in-kernel program cost (BPF_ENABLE_STATS)",
        "tls-keepalive" => "TLS, keep-alive",
        "tls-newconn" => "TLS, new connection per request",
        "tls-bulk" => "TLS, one-stream bulk",
        "http-keepalive" => "HTTP/1.1, keep-alive",
        "http-close" => "HTTP/1.1, Connection: close",
        "h2c" => "h2c (HTTP/2 prior knowledge)",
        "latency-tls" => "added latency at a fixed rate, TLS",
        "latency-http" => "added latency at a fixed rate, HTTP/1.1",
        "workloads" => "connect() cost vs workload cgroups under one attachment",
        "connections" => "cost vs concurrent connections",
        "rules" => "connect() cost vs rules",
        other => other,
    }
}

/// A human title for known table ids: its words and its id.
fn title(part: &str, id: &str) -> String {
    format!("{} (`{part}/{id}`)", table_words(id))
}

/// A part (binary) in words.
fn part_words(part: &str) -> &str {
    match part {
        "l4" => "kernel path",
        "proxy" => "proxy path",
        "scale" => "scaling",
        other => other,
    }
}

/// What a metric measures, in words, with its unit (plot titles, axes, image texts).
fn metric_words(metric: &str) -> &str {
    match metric {
        "p50_ns" => "median connect() time, ns",
        "p99_ns" => "99th-percentile connect() time, ns",
        "cpu_ns_per_connect" => "client CPU time per connect, ns",
        "load_ms" => "time to load the rule set, ms",
        "replace_ms" => "time to replace the rule set, ms",
        "replace_compile_ms" => "compiling during a replace, ms",
        "replace_p99_connect_us" => "99th-percentile connect() during a replace, µs",
        "replace_max_connect_us" => "slowest connect() during a replace, µs",
        "retire_ms" => "time to retire the old rule set, ms",
        "free_ms" => "time to free the rule set, ms",
        "bytes" => "kernel-accounted memory (memlock), bytes",
        "ns_per_run" => "program time per connect, rotating destinations, ns",
        "ns_per_run_fixed" => "program time per connect, one fixed destination, ns",
        "bpf_ns_per_connect" => "program time per connect, ns",
        "req_per_s" => "requests per second",
        "conn_per_s" => "connections per second",
        "mb_per_s" => "throughput, MB/s",
        "p50_us" => "median latency, µs",
        "p99_us" => "99th-percentile latency, µs",
        "cpu_us_per_req" => "proxy process CPU per request, µs",
        "cpu_us_per_mb" => "proxy process CPU per MB, µs",
        "node_cpu_us_per_req" => "CPU of the whole node per request, µs",
        "node_cpu_us_per_mb" => "CPU of the whole node per MB, µs",
        other => other,
    }
}

/// The title of a table's line plot of `metric`.
fn line_caption(id: &str, metric: &str) -> String {
    format!("{}: {}", table_words(id), metric_words(metric))
}

/// The title of a part's bar chart of `metric` across its tables.
fn bar_caption(part: &str, metric: &str, as_ratio: bool) -> String {
    if as_ratio {
        format!(
            "{}: {}, ratio to direct (1.0 = direct)",
            part_words(part),
            metric_words(metric)
        )
    } else {
        format!("{}: {}", part_words(part), metric_words(metric))
    }
}

/// The markdown of every table, and the plots written to `plots_dir` (linked as `plots_rel/…`).
pub fn render(samples: &[Sample], plots_dir: &Path, plots_rel: &str) -> anyhow::Result<String> {
    std::fs::create_dir_all(plots_dir)
        .with_context(|| format!("creating {}", plots_dir.display()))?;
    let mut md = String::new();
    let mut parts: Vec<&str> = Vec::new();
    for s in samples {
        if !parts.contains(&s.part.as_str()) {
            parts.push(&s.part);
        }
    }
    for part in parts {
        let mut ids: Vec<&str> = Vec::new();
        for s in samples.iter().filter(|s| s.part == part) {
            if !ids.contains(&s.table.as_str()) {
                ids.push(&s.table);
            }
        }
        // Tables without sizes are summarised across tables in one bar chart per metric.
        let mut unsized_tables: Vec<(&str, Table)> = Vec::new();
        for id in ids {
            let rows: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.part == part && s.table == id)
                .collect();
            let t = table(&rows);
            writeln!(md, "\n#### {}\n", title(part, id))?;
            md_table(&mut md, &t)?;
            let sized = t.rows.iter().any(|(_, s)| s.is_some());
            if sized {
                for m in t.metrics.iter().filter(|m| plotted(m)) {
                    let file = format!("{part}-{id}-{m}.svg");
                    let caption = line_caption(id, m);
                    if line_plot(&plots_dir.join(&file), &caption, m, &t)? {
                        writeln!(md, "\n![{caption}]({plots_rel}/{file})")?;
                    }
                }
            } else {
                unsized_tables.push((id, t));
            }
        }
        if !unsized_tables.is_empty() {
            let mut metrics: Vec<String> = Vec::new();
            for (_, t) in &unsized_tables {
                for m in &t.metrics {
                    if !metrics.contains(m) {
                        metrics.push(m.clone());
                    }
                }
            }
            writeln!(md)?;
            for m in metrics.into_iter().filter(|m| plotted(m)) {
                let file = format!("{part}-{m}.svg");
                if let Some(caption) = bar_plot(&plots_dir.join(&file), part, &m, &unsized_tables)?
                {
                    writeln!(md, "![{caption}]({plots_rel}/{file})")?;
                }
            }
        }
    }
    Ok(md)
}

fn md_table(md: &mut String, t: &Table) -> anyhow::Result<()> {
    let sized = t.rows.iter().any(|(_, s)| s.is_some());
    // A "vs baseline" column only for metrics the baseline has (a proxy's CPU has no direct
    // counterpart).
    let base_has = |m: &String| {
        t.rows
            .iter()
            .any(|k| is_baseline(&k.0) && t.cells.contains_key(&(k.clone(), m.clone())))
    };
    let mut head = String::from("| configuration |");
    let mut rule = String::from("|---|");
    if sized {
        head.push_str(" size |");
        rule.push_str("---:|");
    }
    for m in &t.metrics {
        let has_base = base_has(m);
        write!(head, " {m} |")?;
        rule.push_str("---:|");
        if has_base {
            write!(head, " {m} vs baseline |")?;
            rule.push_str("---:|");
        }
    }
    head.push_str(" rounds |");
    rule.push_str("---:|");
    writeln!(md, "{head}\n{rule}")?;
    for k in &t.rows {
        let mut line = format!("| {} |", k.0);
        if sized {
            match k.1 {
                Some(s) => write!(line, " {s} |")?,
                None => line.push_str(" – |"),
            }
        }
        let mut rounds = 0;
        for m in &t.metrics {
            let has_base = base_has(m);
            match t.cells.get(&(k.clone(), m.clone())) {
                Some(c) => {
                    rounds = rounds.max(c.rounds);
                    write!(line, " {} |", num(c.value))?;
                    if has_base {
                        match (c.ratio, c.added) {
                            (Some((r, lo, hi)), added) => {
                                let add = match added {
                                    Some(a)
                                        if !higher_is_better(m)
                                            && (m.contains("p50") || m.contains("p99")) =>
                                    {
                                        format!(", {}{}", if a >= 0.0 { "+" } else { "" }, num(a))
                                    }
                                    _ => String::new(),
                                };
                                write!(line, " {r:.2} [{lo:.2}–{hi:.2}]{add} |")?
                            }
                            _ if is_baseline(&k.0) => line.push_str(" 1 |"),
                            _ => line.push_str(" – |"),
                        }
                    }
                }
                None => {
                    line.push_str(" – |");
                    if has_base {
                        line.push_str(" – |");
                    }
                }
            }
        }
        write!(line, " {rounds} |")?;
        writeln!(md, "{line}")?;
    }
    Ok(())
}

/// Medians of `metric` against size, one line per configuration, log–log; the baseline (no size)
/// as a flat line. Returns false when there is nothing positive to plot.
fn line_plot(path: &Path, caption: &str, metric: &str, t: &Table) -> anyhow::Result<bool> {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut baseline: Option<f64> = None;
    for k in &t.rows {
        let Some(c) = t.cells.get(&(k.clone(), metric.to_string())) else {
            continue;
        };
        if !(c.value.is_finite() && c.value > 0.0) {
            continue;
        }
        match k.1 {
            None if is_baseline(&k.0) => baseline = Some(c.value),
            None => {}
            Some(size) => match series.iter_mut().find(|(n, _)| *n == k.0) {
                Some((_, pts)) => pts.push((size.max(1) as f64, c.value)),
                None => series.push((k.0.clone(), vec![(size.max(1) as f64, c.value)])),
            },
        }
    }
    if series.is_empty() {
        return Ok(false);
    }
    let xs = series.iter().flat_map(|(_, p)| p.iter().map(|(x, _)| *x));
    let (xmin, xmax) = xs.fold((f64::INFINITY, 0f64), |(a, b), x| (a.min(x), b.max(x)));
    let ys = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .chain(baseline);
    let (ymin, ymax) = ys.fold((f64::INFINITY, 0f64), |(a, b), y| (a.min(y), b.max(y)));
    let (xmin, xmax) = (xmin / 1.5, (xmax * 1.5).max(xmin * 3.0));
    let root = SVGBackend::new(path, (860, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70);
    // The same drawing for a linear or a logarithmic value axis (their coordinate types differ).
    macro_rules! draw {
        ($chart:expr, $ydesc:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc("size (log)")
                .y_desc($ydesc)
                .x_label_formatter(&|x| num(*x))
                .y_label_formatter(&|y| num(*y))
                .draw()
                .map_err(plot_err)?;
            if let Some(b) = baseline {
                chart
                    .draw_series(LineSeries::new(
                        vec![(xmin, b), (xmax, b)],
                        BLACK.stroke_width(1),
                    ))
                    .map_err(plot_err)?
                    .label("baseline")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
            }
            for (i, (name, mut pts)) in series.into_iter().enumerate() {
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                let color = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                    .map_err(plot_err)?
                    .label(name)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                    .map_err(plot_err)?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(plot_err)?;
        }};
    }
    // A log value axis only when the values span more than ~1.5 decades (plotters labels a log
    // axis at powers of ten, so a narrow log axis would have no labels).
    if ymax / ymin > 30.0 {
        let chart = builder
            .build_cartesian_2d(
                (xmin..xmax).log_scale(),
                (ymin / 1.5..ymax * 1.5).log_scale(),
            )
            .map_err(plot_err)?;
        draw!(chart, format!("{} (log)", metric_words(metric)));
    } else {
        let chart = builder
            .build_cartesian_2d((xmin..xmax).log_scale(), 0f64..ymax * 1.15)
            .map_err(plot_err)?;
        draw!(chart, metric_words(metric).to_string());
    }
    root.present().map_err(plot_err)?;
    Ok(true)
}

/// One bar per (table, configuration) of `metric`: the median ratio to the baseline where the
/// table has one (1.0 = as fast as direct), else the median value. Returns the chart's title,
/// or `None` when there is nothing to plot.
fn bar_plot(
    path: &Path,
    part: &str,
    metric: &str,
    tables: &[(&str, Table)],
) -> anyhow::Result<Option<String>> {
    let mut rows: Vec<String> = Vec::new();
    let mut groups: Vec<(&str, Vec<(String, f64)>)> = Vec::new();
    let mut as_ratio = false;
    for (id, t) in tables {
        // A fixed-rate latency scenario's rate is its input, not a result.
        if id.starts_with("latency") && metric.ends_with("_per_s") {
            continue;
        }
        let mut bars = Vec::new();
        for k in &t.rows {
            let Some(c) = t.cells.get(&(k.clone(), metric.to_string())) else {
                continue;
            };
            let v = match c.ratio {
                Some((r, _, _)) => {
                    as_ratio = true;
                    r
                }
                None if is_baseline(&k.0) => 1.0,
                None => c.value,
            };
            if !rows.contains(&k.0) {
                rows.push(k.0.clone());
            }
            bars.push((k.0.clone(), v));
        }
        if !bars.is_empty() {
            groups.push((id, bars));
        }
    }
    if groups.is_empty() {
        return Ok(None);
    }
    // Head room for the legend.
    let ymax = groups
        .iter()
        .flat_map(|(_, b)| b.iter().map(|(_, v)| *v))
        .fold(0f64, f64::max)
        * 1.35;
    let n = groups.len();
    let names: Vec<String> = groups.iter().map(|(id, _)| id.to_string()).collect();
    let root = SVGBackend::new(path, (960, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let caption = bar_caption(part, metric, as_ratio);
    let mut chart = ChartBuilder::on(&root)
        .caption(&caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..ymax.max(1e-9))
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(if as_ratio {
            "ratio to direct"
        } else {
            metric_words(metric)
        })
        .draw()
        .map_err(plot_err)?;
    let width = 0.8 / rows.len().max(1) as f64;
    for (ri, row) in rows.iter().enumerate() {
        let color = Palette99::pick(ri).to_rgba();
        let bars: Vec<Rectangle<(f64, f64)>> = groups
            .iter()
            .enumerate()
            .filter_map(|(gi, (_, b))| b.iter().find(|(r, _)| r == row).map(|(_, v)| (gi, *v)))
            .map(|(gi, v)| {
                let x0 = gi as f64 - 0.4 + ri as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.9, v)], color.filled())
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(plot_err)?
            .label(row.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(Some(caption))
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e:?}")
}

/// Replaces the text between `<!-- compare:begin -->` and `<!-- compare:end -->` in `file`
/// (appending the markers and the section when they are missing).
pub fn splice(file: &Path, section: &str) -> anyhow::Result<()> {
    const BEGIN: &str = "<!-- compare:begin (generated by `cargo xtask bench --compare`; edits here are overwritten) -->";
    const END: &str = "<!-- compare:end -->";
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let begin_at = text.find("<!-- compare:begin");
    let end_at = text.find(END);
    let new = match (begin_at, end_at) {
        (Some(b), Some(e)) if e > b => format!(
            "{}{BEGIN}\n{section}\n{END}{}",
            &text[..b],
            &text[e + END.len()..]
        ),
        _ => format!("{text}\n{BEGIN}\n{section}\n{END}\n"),
    };
    std::fs::write(file, new).with_context(|| format!("writing {}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(
        table: &str,
        row: &str,
        size: Option<u64>,
        round: u32,
        metric: &str,
        value: f64,
    ) -> Sample {
        Sample {
            part: "l4".into(),
            table: table.into(),
            row: row.into(),
            size,
            round,
            metric: metric.into(),
            value,
        }
    }

    #[test]
    fn ratios_are_per_round_and_medians() {
        let samples = [
            s("t", "none", None, 0, "p50_ns", 100.0),
            s("t", "none", None, 1, "p50_ns", 200.0),
            s("t", "none", None, 2, "p50_ns", 100.0),
            s("t", "ours", Some(10), 0, "p50_ns", 110.0),
            s("t", "ours", Some(10), 1, "p50_ns", 240.0),
            s("t", "ours", Some(10), 2, "p50_ns", 150.0),
        ];
        let refs: Vec<&Sample> = samples.iter().collect();
        let t = table(&refs);
        let c = t.cells[&(("ours".to_string(), Some(10)), "p50_ns".to_string())];
        assert_eq!(c.value, 150.0);
        let (r, lo, hi) = c.ratio.unwrap();
        assert!(
            (r - 1.2).abs() < 1e-9 && (lo - 1.1).abs() < 1e-9 && (hi - 1.5).abs() < 1e-9,
            "{r} {lo} {hi}"
        );
        assert_eq!(c.added, Some(40.0));
        assert_eq!(t.rows[0].0, "none");
    }

    /// The committed plots (docs/bench/*.svg) and their images in BENCHMARKS.md carry the titles
    /// this code gives them, so a re-render (`cargo xtask bench --compare --report-only`) only
    /// changes what the data changes. `XTASK_BLESS=1` rewrites titles and axis texts in place.
    #[test]
    fn committed_plots_are_titled_in_words() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let bless = std::env::var_os("XTASK_BLESS").is_some();
        let bench_md = root.join("BENCHMARKS.md");
        let mut md = std::fs::read_to_string(&bench_md).unwrap();
        let mut bad = Vec::new();
        let mut dir: Vec<PathBuf> = std::fs::read_dir(root.join("docs/bench"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "svg"))
            .collect();
        dir.sort();
        assert!(!dir.is_empty());
        for path in dir {
            let file = path.file_name().unwrap().to_str().unwrap().to_string();
            let stem = file.trim_end_matches(".svg");
            let (part, rest) = stem.split_once('-').unwrap();
            let mut svg = std::fs::read_to_string(&path).unwrap();
            // `<text …>\nCAPTION\n</text>`: the first text element is the title.
            let texts: Vec<String> = svg
                .split("</text>")
                .filter_map(|t| t.rsplit_once('>').map(|(_, v)| v.trim().to_string()))
                .filter(|t| !t.is_empty())
                .collect();
            let old_caption = texts.first().cloned().unwrap_or_default();
            let (want, metric, y_old) = match rest.rsplit_once('-') {
                // `{part}-{table}-{metric}.svg`: a table's line plot.
                Some((id, metric)) => (
                    line_caption(id, metric),
                    metric,
                    vec![metric.to_string(), format!("{metric} (log)")],
                ),
                // `{part}-{metric}.svg`: the part's bar chart.
                None => (
                    bar_caption(part, rest, old_caption.contains("ratio to direct")),
                    rest,
                    vec![rest.to_string()],
                ),
            };
            if old_caption != want {
                if bless {
                    svg = svg.replacen(
                        &format!(">\n{old_caption}\n</text>"),
                        &format!(">\n{want}\n</text>"),
                        1,
                    );
                    for y in &y_old {
                        let words = if y.ends_with(" (log)") {
                            format!("{} (log)", metric_words(metric))
                        } else {
                            metric_words(metric).to_string()
                        };
                        svg = svg
                            .replace(&format!(">\n{y}\n</text>"), &format!(">\n{words}\n</text>"));
                    }
                    std::fs::write(&path, &svg).unwrap();
                } else {
                    bad.push(format!("{file}: title {old_caption:?}, want {want:?}"));
                }
            }
            // Its image in BENCHMARKS.md: `![TITLE](docs/bench/FILE)`.
            let link = format!("](docs/bench/{file})");
            if let Some(at) = md.find(&link) {
                let open = md[..at].rfind("![").unwrap();
                let alt = md[open + 2..at].to_string();
                if alt != want {
                    if bless {
                        md.replace_range(open + 2..at, &want);
                    } else {
                        bad.push(format!(
                            "BENCHMARKS.md image of {file}: {alt:?}, want {want:?}"
                        ));
                    }
                }
            }
        }
        if bless {
            std::fs::write(&bench_md, md).unwrap();
        }
        assert!(
            bad.is_empty(),
            "run with XTASK_BLESS=1:\n{}",
            bad.join("\n")
        );
    }

    #[test]
    fn splice_replaces_only_the_section() {
        let dir = std::env::temp_dir().join(format!("xtask-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("B.md");
        std::fs::write(&f, "# B\nkeep\n").unwrap();
        splice(&f, "one").unwrap();
        splice(&f, "two").unwrap();
        let t = std::fs::read_to_string(&f).unwrap();
        assert!(
            t.starts_with("# B\nkeep\n") && t.contains("\ntwo\n") && !t.contains("one"),
            "{t}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
