//! Every candidate QR decoder on tern's QR test set: which pictures each
//! reads, and how long each takes (the picture already decoded to grey;
//! zbarimg as a process, so its time includes starting it and reading the
//! file).

#[path = "../../../tests/qr_common/mod.rs"]
mod qr_common;

use std::time::Instant;

use image::{imageops, GrayImage, Luma};
use qr_common::*;

type Decoder = (&'static str, fn(&GrayImage) -> Option<String>);

const DECODERS: [Decoder; 6] = [
    ("rqrr", tern::cli::qr::quirc),
    ("rqrr+pre", rqrr_preprocessed),
    ("rxing", |i| tern::cli::qr::zxing(i, false)),
    ("rxing+inv", |i| tern::cli::qr::zxing(i, true)),
    ("quircs", quircs),
    ("tern", tern::cli::qr::decode),
];

/// rqrr behind the usual preprocessing: a scaling pyramid (up for small
/// codes, down for large pictures), both polarities, and a local-mean
/// (adaptive) threshold.
fn rqrr_preprocessed(img: &GrayImage) -> Option<String> {
    let side = img.width().min(img.height());
    let mut scales = vec![1.0f32];
    if side < 600 {
        scales.push(2.0);
    }
    if side < 300 {
        scales.push(3.0);
    }
    if side > 1000 {
        scales.push(0.5);
    }
    for s in scales {
        let base = if s == 1.0 {
            img.clone()
        } else {
            let w = (img.width() as f32 * s).round() as u32;
            let h = (img.height() as f32 * s).round() as u32;
            imageops::resize(img, w, h, imageops::FilterType::Triangle)
        };
        let radius = (base.width().min(base.height()) / 40).max(4);
        let mut inverted = base.clone();
        imageops::invert(&mut inverted);
        for candidate in [base, inverted] {
            if let Some(t) = tern::cli::qr::quirc(&candidate) {
                return Some(t);
            }
            if let Some(t) = tern::cli::qr::quirc(&adaptive_threshold(&candidate, radius, 8)) {
                return Some(t);
            }
        }
    }
    None
}

/// Dark where a pixel is below the mean of its (2r+1)² window minus `c`.
fn adaptive_threshold(img: &GrayImage, r: u32, c: i64) -> GrayImage {
    let (w, h) = img.dimensions();
    let stride = (w + 1) as usize;
    let mut sums = vec![0i64; stride * (h + 1) as usize];
    for y in 0..h as usize {
        let mut row = 0i64;
        for x in 0..w as usize {
            row += i64::from(img.get_pixel(x as u32, y as u32).0[0]);
            sums[(y + 1) * stride + x + 1] = sums[y * stride + x + 1] + row;
        }
    }
    GrayImage::from_fn(w, h, |x, y| {
        let (x0, y0) = (x.saturating_sub(r) as usize, y.saturating_sub(r) as usize);
        let (x1, y1) = ((x + r + 1).min(w) as usize, (y + r + 1).min(h) as usize);
        let sum = sums[y1 * stride + x1] - sums[y1 * stride + x0] - sums[y0 * stride + x1]
            + sums[y0 * stride + x0];
        let n = ((x1 - x0) * (y1 - y0)) as i64;
        let v = i64::from(img.get_pixel(x, y).0[0]) * n;
        Luma([if v < sum - c * n { 0 } else { 255 }])
    })
}

fn quircs(img: &GrayImage) -> Option<String> {
    let mut q = quircs::Quirc::default();
    let codes = q.identify(img.width() as usize, img.height() as usize, img.as_raw());
    codes.flatten().find_map(|c| {
        c.decode()
            .ok()
            .and_then(|d| String::from_utf8(d.payload).ok())
    })
}

fn main() {
    let convert = imagemagick().expect("ImageMagick is needed");
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<&str> = std::iter::once("zbarimg")
        .chain(DECODERS.iter().map(|d| d.0))
        .collect();
    println!("| picture | {} |", names.join(" | "));
    println!("|---|{}", "---|".repeat(names.len()));
    let mut read = vec![0usize; names.len()];
    let mut millis = vec![Vec::new(); names.len()];
    let mut misses = vec![Vec::new(); names.len()];
    let mut total = 0;
    // More seeds: more invitations of each size, the same pictures of each.
    let seeds: u64 = std::env::args()
        .nth(1)
        .map_or(1, |s| s.parse().expect("the number of seeds"));
    for (n, seed) in [1, 3]
        .into_iter()
        .flat_map(|n| (0..seeds).map(move |s| (n, s)))
    {
        let (png, link) = seeded_invitation_png(n, seed, dir.path());
        let w = image::image_dimensions(&png).unwrap().0;
        for (name, args) in recipes(w) {
            let out = dir.path().join(format!("relays{n}-seed{seed}-{name}"));
            make(convert, &png, &args, &out);
            total += 1;
            let img = image::open(&out).unwrap().to_luma8();
            let t = Instant::now();
            let z = zbarimg(&out).as_deref() == Some(link.as_str());
            let mut row = vec![(z, t.elapsed().as_secs_f64() * 1e3)];
            for (_, decode) in DECODERS {
                let t = Instant::now();
                let ok = decode(&img).as_deref() == Some(link.as_str());
                row.push((ok, t.elapsed().as_secs_f64() * 1e3));
            }
            let cells: Vec<String> = row
                .iter()
                .map(|(ok, ms)| format!("{} {ms:.0}", if *ok { "✓" } else { "✗" }))
                .collect();
            println!(
                "| {n} relay(s), seed {seed}, {name} | {} |",
                cells.join(" | ")
            );
            for (i, (ok, ms)) in row.iter().enumerate() {
                read[i] += usize::from(*ok);
                millis[i].push(*ms);
                if row[0].0 && !ok {
                    misses[i].push(format!("{n}-{seed}-{name}"));
                }
            }
        }
    }
    let fmt = |v: Vec<String>| v.join(" | ");
    println!(
        "| **read (of {total})** | {} |",
        fmt(read.iter().map(|r| format!("**{r}**")).collect())
    );
    println!(
        "| **missed of what zbarimg reads** | {} |",
        fmt(misses.iter().map(|m| m.len().to_string()).collect())
    );
    let stat = |v: &Vec<f64>, q: f64| {
        let mut s = v.clone();
        s.sort_by(f64::total_cmp);
        s[((s.len() - 1) as f64 * q).round() as usize]
    };
    println!(
        "| median ms | {} |",
        fmt(millis
            .iter()
            .map(|m| format!("{:.1}", stat(m, 0.5)))
            .collect())
    );
    println!(
        "| slowest ms | {} |",
        fmt(millis
            .iter()
            .map(|m| format!("{:.0}", stat(m, 1.0)))
            .collect())
    );
    for (name, m) in names.iter().zip(&misses) {
        if !m.is_empty() {
            eprintln!("{name} misses what zbarimg reads: {}", m.join(", "));
        }
    }
}
