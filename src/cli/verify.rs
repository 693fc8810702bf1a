//! `tern verify`: compare security codes out of band.

use super::exit::{fail, CODE_MISMATCH, USAGE};
use super::output::{json, line, note, stdout_is_terminal};
use super::{qr, unlock, Cli};
use crate::proto::security_code::codes_match;

/// Show a contact's security code, or compare it with theirs
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  tern verify bob                       # show the code (and its QR code)\n  tern verify bob '12345 67890 …'        # compare with the code Bob reads out\n\nA mismatch exits with status 4: someone may have swapped the invitation."
)]
pub struct Args {
    /// The contact's name (see `tern contacts`)
    pub contact: String,
    /// The code the contact sees: 30 digits; spaces and dashes are ignored
    pub code: Option<String>,
    /// Print one JSON object: the code, or whether the codes match
    #[arg(long)]
    pub json: bool,
}

/// Digits of a code as typed: `Some` only for something that is a code
/// (30 digits, with any spaces and dashes, or the `TERN-CODE:` text of the
/// QR code), so a typo in the command is a usage error, not a mismatch.
fn parse_code(typed: &str) -> Option<String> {
    let t = typed.trim();
    let t = t.strip_prefix("TERN-CODE:").unwrap_or(t);
    if !t
        .chars()
        .all(|c| c.is_ascii_digit() || c == ' ' || c == '-')
    {
        return None;
    }
    let digits: String = t.chars().filter(char::is_ascii_digit).collect();
    (digits.len() == 30).then_some(digits)
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let theirs = match &args.code {
        Some(typed) => Some(parse_code(typed).ok_or_else(|| {
            fail(
                USAGE,
                "that is not a security code: a code is 30 digits in six groups \
                 (`tern verify CONTACT` shows yours); nothing was compared",
            )
        })?),
        None => None,
    };
    let mut client = unlock::open(cli)?;
    let id = client.contact_id(&args.contact)?;
    let contact = client.contact(&id)?;
    // With several devices, the contact is known by the code of the first
    // connection; the others were introduced through it.
    let Some(ours) = contact.code().map(|c| c.code) else {
        return Err(fail(
            USAGE,
            format!(
                "{} has not accepted the invitation yet: no code to compare",
                args.contact
            ),
        ));
    };
    match &theirs {
        None if args.json => {
            json(&serde_json::json!({
                "contact": contact.name,
                "code": ours,
                "verified": contact.code().is_some_and(|r| r.verified),
            }));
            Ok(())
        }
        None => {
            if stdout_is_terminal() {
                print!(
                    "{}",
                    qr::terminal(
                        &format!("TERN-CODE:{}", ours.replace(' ', "")),
                        std::env::var_os("NO_COLOR").is_none()
                    )?
                );
            }
            line(&ours);
            Ok(())
        }
        Some(theirs) => {
            let matched = codes_match(&ours, theirs);
            if args.json {
                json(&serde_json::json!({
                    "contact": contact.name,
                    "match": matched,
                    "verified": matched,
                }));
            }
            if !matched {
                return Err(fail(
                    CODE_MISMATCH,
                    format!(
                        "SECURITY CODES DIFFER for {}: the connection may be intercepted. Do not trust it; \
                         make a new invitation in person",
                        args.contact
                    ),
                ));
            }
            for m in client.group_members(&id)? {
                client.update_contact(&m, |_, c| {
                    match &mut c.root_code {
                        Some(r) => r.verified = true,
                        None => c.conn.verified = true,
                    }
                    Ok(())
                })?;
            }
            note(&format!("codes match: {} is verified", args.contact));
            Ok(())
        }
    }
}
