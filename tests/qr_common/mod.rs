//! Shared by the QR tests (and scripts/qr-bench): fixed invitations, the
//! ImageMagick recipes of the test set, and zbarimg.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tern::proto::invitation::{Invitation, SendQueue};

/// `convert` from ImageMagick, if installed (another program of that name
/// may stand first in PATH).
pub fn imagemagick() -> Option<&'static str> {
    ["convert", "/usr/bin/convert"].into_iter().find(|c| {
        Command::new(c)
            .arg("-version")
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("ImageMagick"))
    })
}

/// What zbarimg reads in a picture, if anything.
pub fn zbarimg(path: &Path) -> Option<String> {
    let o = Command::new("zbarimg")
        .args(["--raw", "-q"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("running zbarimg");
    let text = String::from_utf8_lossy(&o.stdout).trim().to_string();
    (o.status.success() && !text.is_empty()).then_some(text)
}

/// A fixed invitation with `n` relays (every byte from a fixed seed, so the
/// pictures are the same on every run) drawn as `tern invite --png` draws
/// it; its PNG and its link.
pub fn invitation_png(n: usize, dir: &Path) -> (PathBuf, String) {
    seeded_invitation_png(n, 0, dir)
}

/// The same with another seed: another invitation of the same size.
pub fn seeded_invitation_png(n: usize, seed: u64, dir: &Path) -> (PathBuf, String) {
    let link = seeded_invitation(n, seed).to_link();
    let png = dir.join(format!("relays{n}-seed{seed}.png"));
    tern::cli::qr::png(&link, &png).unwrap();
    assert_eq!(tern::cli::qr::decode_file(&png).unwrap(), link);
    (png, link)
}

/// An invitation with `n` relays, every byte from a fixed seed.
pub fn fixed_invitation(n: usize) -> Invitation {
    seeded_invitation(n, 0)
}

fn seeded_invitation(n: usize, seed: u64) -> Invitation {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ n as u64 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut bytes = |len: usize| -> Vec<u8> {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    };
    Invitation {
        invitation_key: bytes(32).try_into().unwrap(),
        ratchet_key: bytes(32).try_into().unwrap(),
        queues: (0..n)
            .map(|i| SendQueue {
                relay: format!(
                    "tern://{}@198.51.100.{}:5223",
                    data_encoding::BASE64URL_NOPAD.encode(&bytes(32)),
                    10 + i
                )
                .parse()
                .unwrap(),
                sender_id: bytes(16).try_into().unwrap(),
            })
            .collect(),
    }
}

/// Every picture of the set: a name and the ImageMagick arguments that make
/// it from the `w`×`w` pixel PNG of the invitation (`IN` and `OUT` stand for
/// the files).
pub fn recipes(w: u32) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for s in [
        25, 30, 35, 40, 45, 50, 55, 60, 70, 80, 90, 110, 125, 150, 175, 200,
    ] {
        out.push((format!("scale{s}.png"), format!("IN -resize {s}% OUT")));
    }
    for r in [5, 17, 30, 45, 90, 180] {
        out.push((
            format!("rotate{r}.png"),
            format!("IN -background white -rotate {r} OUT"),
        ));
    }
    for b in ["1", "1.5", "2", "2.5"] {
        out.push((format!("blur{b}.png"), format!("IN -blur 0x{b} OUT")));
    }
    let (m, q) = (w - 70, w - 80);
    let p1 = format!(
        "0,0 40,60  {w},0 {m},15  0,{w} 20,{}  {w},{w} {},{q}",
        w - 30,
        w - 15
    );
    let p2 = format!(
        "0,0 0,0  {w},0 {w},{}  0,{w} 0,{w}  {w},{w} {w},{}",
        w / 5,
        w - w / 5
    );
    let light = format!("( +clone -sparse-color Barycentric \"0,0 gray35 {w},{w} white\" ) -compose multiply -composite");
    let light2 = format!("( +clone -sparse-color Barycentric \"{w},0 gray45 0,{w} white\" ) -compose multiply -composite");
    let photo1 = format!(
        "0,0 30,50  {w},0 {},10  0,{w} 10,{}  {w},{w} {},{}",
        w - 40,
        w - 20,
        w - 30,
        w - 60
    );
    let photo2 = format!(
        "0,0 0,0  {w},0 {},40  0,{w} 30,{w}  {w},{w} {w},{}",
        w - 50,
        w - 20
    );
    let fixed = [
        // The issue's own examples.
        ("issue-60-rotate17-blur1.2.png", "IN -resize 60% -background white -rotate 17 -blur 0x1.2 OUT".to_string()),
        ("issue-90-blur1.png", "IN -resize 90% -blur 0x1 OUT".into()),
        ("scale50-rotate17.png", "IN -resize 50% -background white -rotate 17 OUT".into()),
        ("scale50-blur0.8.png", "IN -resize 50% -blur 0x0.8 OUT".into()),
        ("perspective1.png", format!("IN -virtual-pixel white -distort Perspective \"{p1}\" OUT")),
        ("perspective2.png", format!("IN -virtual-pixel white -distort Perspective \"{p2}\" OUT")),
        ("noise0.8.png", "IN -seed 1 -attenuate 0.8 +noise Gaussian OUT".into()),
        ("noise1.5.png", "IN -seed 2 -attenuate 1.5 +noise Gaussian OUT".into()),
        ("scale50-noise1.png", "IN -resize 50% -seed 3 -attenuate 1.0 +noise Gaussian OUT".into()),
        ("uneven-light.png", format!("IN {light} OUT")),
        ("jpeg30.jpg", "IN -quality 30 OUT".into()),
        ("scale50-jpeg30.jpg", "IN -resize 50% -quality 30 OUT".into()),
        ("inverted.png", "IN -negate OUT".into()),
        ("scale50-inverted.png", "IN -resize 50% -negate OUT".into()),
        (
            "screenshot.png",
            "-size 1920x1080 xc:gray85 -fill white -draw \"rectangle 100,80 1820,1000\" -fill gray30 \
             -draw \"rectangle 100,80 1820,130\" -fill black -draw \"rectangle 160,200 600,220\" \
             -draw \"rectangle 160,260 520,280\" IN -geometry +900+200 -composite OUT"
                .into(),
        ),
        (
            "screenshot-small.png",
            "-size 1920x1080 xc:gray85 -fill black -draw \"rectangle 160,200 600,220\" ( IN -resize 50% ) \
             -geometry +1300+600 -composite OUT"
                .into(),
        ),
        (
            "photo1.jpg",
            format!(
                "IN -resize 80% -bordercolor white -border 60 -virtual-pixel white -distort Perspective \"{photo1}\" \
                 ( +clone -sparse-color Barycentric \"0,0 gray50 {w},{w} white\" ) -compose multiply -composite \
                 -blur 0x1 -seed 4 -attenuate 0.6 +noise Gaussian -quality 70 OUT"
            ),
        ),
        (
            "photo2.jpg",
            format!(
                "IN -background white -rotate 8 -virtual-pixel white -distort Perspective \"{photo2}\" {light2} \
                 -blur 0x1.3 -seed 5 -attenuate 0.9 +noise Gaussian -quality 60 OUT"
            ),
        ),
        (
            "photo3.jpg",
            format!(
                "IN -resize 60% -background white -rotate -12 -blur 0x1 ( +clone -sparse-color Barycentric \
                 \"0,0 gray60 {w},0 white\" ) -compose multiply -composite -seed 6 -attenuate 0.5 +noise Gaussian \
                 -quality 50 OUT"
            ),
        ),
    ];
    out.extend(fixed.into_iter().map(|(n, a)| (n.to_string(), a)));
    out.into_iter()
        .map(|(name, args)| (name, split_args(&args)))
        .collect()
}

/// Splits on spaces, keeping "double-quoted" arguments whole.
fn split_args(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

pub fn make(convert: &str, input: &Path, args: &[String], output: &Path) {
    let mut c = Command::new(convert);
    for a in args {
        match a.as_str() {
            "IN" => c.arg(input),
            "OUT" => c.arg(output),
            a => c.arg(a),
        };
    }
    let o = c
        .stdin(Stdio::null())
        .output()
        .expect("running ImageMagick");
    assert!(
        o.status.success() && output.is_file(),
        "{convert} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}
