//! `tern generate` (hidden): writes the man pages and shell completions from
//! the clap definitions, so they never drift from the real options. The
//! checked-in copies under man/ and completions/ are compared with fresh
//! output by a test.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;
use serde_json::Value;

use super::Cli;

/// Write man pages and shell completions
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory to write man/ and completions/ into
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
}

const EXIT_STATUS: &str = r#".SH "EXIT STATUS"
.TP
\fB0\fR
Success.
.TP
\fB1\fR
An error not listed below.
.TP
\fB2\fR
Usage error: bad arguments or options, a name with control or format characters, a passphrase too weak (see \fB\-\-allow\-weak\-passphrase\fR), an output file that exists (see \fB\-\-force\fR); nothing was changed.
.TP
\fB3\fR
No contact by that name (for \fBtern device remove\fR: no device by that name).
.TP
\fB4\fR
\fBtern verify\fR: the security codes differ. Do not trust the connection.
.TP
\fB5\fR
Wrong passphrase or retired key, or a passphrase is needed and there is no terminal to ask on (no \fB\-\-passphrase\-file\fR, \fBTERN_PASSPHRASE_FILE\fR or \fB\-\-identity\fR given).
.TP
\fB6\fR
Not a usable invitation: a damaged link (a mistyped, missing or extra character: its checksum does not match), a malformed link, an image without a QR code, a newer protocol version, a device link given to \fBtern accept\fR or a contact invitation given to \fBtern device join\fR, or one already used.
.TP
\fB7\fR
No profile in the home directory: run \fBtern init\fR.
.TP
\fB8\fR
Permanently gone: this device was removed from the profile by another one; \fBtern send\fR and \fBtern recv\fR refuse for good.
.TP
\fB9\fR
\fBtern send \-\-wait\-delivered\fR: the message is on a relay, but no device of the contact confirmed storing it in time (it may still arrive; a contact who turned receipts off never confirms). Sending again would send a second copy.
.TP
\fB66\fR
\fBtern recv \-\-fail\-if\-empty\fR: no message arrived.
.TP
\fB75\fR
Temporary failure: no relay could be reached or the queue is full. The work is kept and retried by the next \fBtern send\fR or \fBtern recv\fR.
"#;

const ENVIRONMENT: &str = r#".SH ENVIRONMENT
.TP
\fBTERN_HOME\fR
The profile directory, as \fB\-\-home\fR.
.TP
\fBTERN_PASSPHRASE\fR
The passphrase itself. Visible to other processes of the same user; prefer \fBTERN_PASSPHRASE_FILE\fR.
.TP
\fBTERN_PASSPHRASE_FILE\fR
A file whose first line is the passphrase, as \fB\-\-passphrase\-file\fR.
.TP
\fBTERN_IDENTITY\fR
An identity file from \fBtern key export\fR, as \fB\-\-identity\fR.
.TP
\fBTERN_RELAY_DATA\fR
The relay's data directory, as \fBtern relay serve \-\-data\fR.
.TP
\fBPORT\fR
\fBtern relay serve\fR listens on this port, overriding \fB\-\-listen\fR's.
.TP
\fBTERN_NO_DAEMON\fR
Set and not empty: \fBtern send\fR, \fBtern recv\fR, \fBtern contacts\fR and \fBtern log\fR work alone even when a \fBtern daemon\fR serves their home.
.TP
\fBXDG_DATA_HOME\fR
Base of the default profile and relay directories.
.TP
\fBXDG_RUNTIME_DIR\fR
\fBtern daemon\fR's socket goes in \fItern/\fR there by default.
.TP
\fBNO_COLOR\fR
QR codes on the terminal are drawn without colours: the light modules in the text colour, so that a dark terminal shows a normal dark\-on\-light code (a light terminal shows it light on dark, which tern and most phones also read).
.TP
\fBCOLORFGBG\fR
As set by rxvt, Konsole and others (\fIforeground\fR;\fIbackground\fR): with NO_COLOR and a light background (7 or 9\-15), the dark modules are drawn instead.
.TP
\fBCOLUMNS\fR, \fBLINES\fR
When both are set, the size of the terminal a QR code must fit (else the size of the terminal on standard output). A code that does not fit is not drawn: tern says how much room it needs and offers \fB\-\-png\fR and \fB\-\-link\fR.
"#;

const JSON: &str = r#".SH "JSON OUTPUT"
With \fB\-\-json\fR, commands print one JSON object per line on standard output, and diagnostics stay on standard error.
Strings are exact: control and format characters are written as \fB\\u\fR escapes, never raw.
Times are RFC 3339 UTC strings (\fB2026\-01\-31T18:00:00Z\fR), with the same instant in milliseconds since the Unix epoch in a field ending in \fB_ms\fR.
.PP
\fBtern recv \-\-json\fR and \fBtern log \-\-json\fR print messages in one schema:
.TP
\fBtype\fR
\fB"message"\fR (recv also prints \fB"connected"\fR and \fB"profile"\fR events, with \fBcontact\fR and \fBfrom\fR).
.TP
\fBcontact\fR
The conversation: the contact's name in this profile.
.TP
\fBfrom\fR
Who wrote it: the contact's name, or this profile's own name for what you (or another of your devices) sent.
.TP
\fBdirection\fR
\fB"in"\fR or \fB"out"\fR.
.TP
\fBtext\fR, \fBid\fR
The message, and its 16\-byte id in hex (the same on every device).
.TP
\fBsent_at\fR, \fBsent_at_ms\fR
When the sender wrote it, by the sender's clock.
.TP
\fBreceived_at\fR, \fBreceived_at_ms\fR
When this device stored it; null for messages written here.
.TP
\fBorder\fR
recv only: \fB"in\-order"\fR, \fB"after\-gap"\fR (earlier messages are missing) or \fB"late"\fR (a missing one arrived).
.PP
\fBtern send\fR, \fBaccept\fR, \fBinvite\fR, \fBverify\fR, \fBcontacts\fR, \fBprofile\fR, \fBrelays\fR and \fBdevice list\fR print one object each (see their pages).
"#;

/// `tern daemon` and `tern jsonrpc`: the protocol, from
/// docs/jsonrpc.schema.json (so the page cannot list a method, parameter or
/// code the schema does not, nor miss one).
const SCHEMA: &str = include_str!("../../docs/jsonrpc.schema.json");

/// Text for roff: backslashes and hyphens escaped, and no line starting
/// with a control character.
fn roff(text: &str) -> String {
    let s = text.replace('\\', "\\e").replace('-', "\\-");
    if s.starts_with('.') || s.starts_with('\'') {
        format!("\\&{s}")
    } else {
        s
    }
}

/// The schema at a `#/…` reference, or `v` itself.
fn resolve<'a>(root: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => root
            .pointer(r.trim_start_matches('#'))
            .map_or(v, |t| resolve(root, t)),
        None => v,
    }
}

/// `{a, b?}`: an object's fields, `?` for those not required.
fn fields(root: &Value, schema: &Value) -> String {
    let outer = resolve(root, schema);
    // `{allOf: [base], required: [more]}`: the base's fields, more of them
    // required.
    let s = outer
        .get("allOf")
        .and_then(|a| a.get(0))
        .map_or(outer, |first| resolve(root, first));
    let required: Vec<&str> = [s, outer]
        .iter()
        .filter_map(|v| v["required"].as_array())
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let names: Vec<String> = s["properties"]
        .as_object()
        .map(|p| {
            p.keys()
                .map(|k| {
                    if required.contains(&k.as_str()) {
                        k.clone()
                    } else {
                        format!("{k}?")
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    format!("{{{}}}", names.join(", "))
}

/// A result in a few words: its fields, or an array of them.
fn shape(root: &Value, schema: &Value) -> String {
    let s = resolve(root, schema);
    if s["type"] == "array" {
        format!("an array of {}", shape(root, &s["items"]))
    } else {
        fields(root, s)
    }
}

fn jsonrpc_section() -> String {
    let root: Value = serde_json::from_str(SCHEMA).expect("docs/jsonrpc.schema.json is JSON");
    let text = |v: &Value| roff(v.as_str().unwrap_or_default());
    let mut out = String::from(
        ".SH \"JSON\\-RPC\"\nJSON\\-RPC 2.0, one object per line each way (batches too; lines up to 1 MiB). \
         Every method takes an optional \\fBprofile\\fR (the home as given, or the profile's name), needed \
         when several are served. Generated from \\fIdocs/jsonrpc.schema.json\\fR, which describes every \
         field; \\fIdocs/JSONRPC.md\\fR explains the delivery contract.\n.SS Methods\n",
    );
    for (name, m) in root["methods"].as_object().into_iter().flatten() {
        out.push_str(&format!(
            ".TP\n\\fB{}\\fR {}\n{} Result: {}.",
            roff(name),
            roff(&fields(&root, &m["params"])),
            text(&m["description"]),
            roff(&shape(&root, &m["result"])),
        ));
        let errors: Vec<String> = m["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| roff(&c.to_string()))
            .collect();
        if !errors.is_empty() {
            out.push_str(&format!(" Errors: {}.", errors.join(", ")));
        }
        out.push('\n');
    }
    out.push_str(".SS Notifications\n");
    for (name, n) in root["notifications"].as_object().into_iter().flatten() {
        out.push_str(&format!(
            ".TP\n\\fB{}\\fR {}\n{}\n",
            roff(name),
            roff(&fields(&root, &n["params"])),
            text(&n["description"]),
        ));
    }
    out.push_str(&format!(
        ".SS \"Error codes\"\n{}\n",
        text(&root["common_errors_description"])
    ));
    for (code, what) in root["error_codes"].as_object().into_iter().flatten() {
        out.push_str(&format!(".TP\n\\fB{}\\fR\n{}\n", roff(code), text(what)));
    }
    out.push_str("tern's own errors carry \\fBdata.exit_code\\fR and \\fBdata.retryable\\fR.\n");
    out
}

const FILES: &str = r#".SH FILES
.TP
\fI$XDG_DATA_HOME/tern/\fR (default \fI~/.local/share/tern/\fR)
The profile. \fIkey.age\fR is the profile key encrypted with the passphrase (a standard age file: \fBage \-d key.age\fR opens it);
\fIstore.db\fR (SQLite, with \fIstore.db\-wal\fR) holds settings, contacts, keys and history, every value encrypted under that key.
A profile made with \fB\-\-no\-passphrase\fR keeps its key in \fIidentity\-unprotected.txt\fR instead.
.TP
\fI$XDG_DATA_HOME/tern\-relay/\fR (default \fI~/.local/share/tern\-relay/\fR)
A relay: \fIidentity.key\fR (its secret key, mode 0600) and its queue database.
"#;

fn man_page(cmd: clap::Command, name: &str, extra: &str, dir: &Path) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.name(name.to_string()))
        .render(&mut buf)
        .context("rendering a man page")?;
    buf.write_all(extra.as_bytes())?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))
}

/// `.SH "SEE ALSO"`: the page above this one, and tern(1).
fn see_also(parents: &[String]) -> String {
    let mut refs: Vec<String> = Vec::new();
    for i in (1..=parents.len()).rev() {
        refs.push(format!("\\fB{}\\fR(1)", parents[..i].join("\\-")));
    }
    format!(".SH \"SEE ALSO\"\n{}\n", refs.join(", "))
}

/// One page for `cmd` and, below it, one for every subcommand at any
/// depth (`tern-device-link.1`), each naming the pages it links to. The
/// `help` subcommands clap adds are left out of the pages (they print
/// these same texts).
fn man_tree(cmd: &clap::Command, path: &[String], dir: &Path) -> anyhow::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let mut here = path.to_vec();
        here.push(sub.get_name().to_string());
        let name = here.join("-");
        let page = sub
            .clone()
            .disable_help_subcommand(true)
            .bin_name(here.join(" "));
        let protocol = match name.as_str() {
            "tern-daemon" | "tern-jsonrpc" => jsonrpc_section(),
            _ => String::new(),
        };
        man_page(
            page,
            &name,
            &format!("{protocol}{EXIT_STATUS}{}", see_also(path)),
            dir,
        )?;
        man_tree(sub, &here, dir)?;
    }
    Ok(())
}

pub fn write_all(out: &Path) -> anyhow::Result<()> {
    let man = out.join("man");
    let comp = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&comp)?;
    let cmd = Cli::command();
    man_page(
        cmd.clone().disable_help_subcommand(true),
        "tern",
        &format!("{EXIT_STATUS}{ENVIRONMENT}{FILES}{JSON}"),
        &man,
    )?;
    man_tree(&cmd, &["tern".to_string()], &man)?;
    for shell in [
        Shell::Bash,
        Shell::Zsh,
        Shell::Fish,
        Shell::Elvish,
        Shell::PowerShell,
    ] {
        let mut c = Cli::command();
        clap_complete::generate_to(shell, &mut c, "tern", &comp).context("writing completions")?;
    }
    Ok(())
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    write_all(&args.out)
}
