
use builtin;
use str;

set edit:completion:arg-completer[tern] = {|@words|
    fn spaces {|n|
        builtin:repeat $n ' ' | str:join ''
    }
    fn cand {|text desc|
        edit:complex-candidate $text &display=$text' '(spaces (- 14 (wcswidth $text)))$desc
    }
    var command = 'tern'
    for word $words[1..-1] {
        if (str:has-prefix $word '-') {
            break
        }
        set command = $command';'$word
    }
    var completions = [
        &'tern'= {
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
            cand init 'Create a profile: display name, relays, and the passphrase that protects it'
            cand invite 'Make a one-time invitation: a QR code to show, a link or a PNG file'
            cand invitations 'List the invitations and device links nobody has used yet, or withdraw one'
            cand accept 'Accept an invitation given as a link, on stdin, or as a picture of its QR code'
            cand send 'Send a message: from the arguments, or from stdin when there are none'
            cand recv 'Receive messages from every contact (and complete pending connections)'
            cand contacts 'List contacts: state, security level, post-quantum protection, relays and last activity'
            cand verify 'Show a contact''s security code, or compare it with theirs'
            cand profile 'Show or change your profile; changes are sent to connected contacts'
            cand log 'Show the local history with a contact, oldest first'
            cand files 'Files in and out'
            cand forget 'Delete a contact on all your devices: its queues, keys and history'
            cand relays 'List, add, remove or test your relays'
            cand rotate 'Move connections to fresh queues and keys (both directions)'
            cand key 'Manage the key that protects the profile'
            cand device 'Link, list and remove the devices that share this profile'
            cand daemon 'Serve profiles to bots and scripts: JSON-RPC 2.0 on a Unix socket'
            cand jsonrpc 'Serve the daemon''s JSON-RPC 2.0 on stdin and stdout, for programs that spawn tern'
            cand relay 'Run a relay, or print the address users add with `tern init --relay`'
            cand generate 'Write man pages and shell completions'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'tern;init'= {
            cand --name 'Your display name, shown to contacts only (never sent to relays)'
            cand --relay 'A relay to receive messages on (repeat for redundancy; up to 3 are used per connection). Addresses look like tern://KEY@HOST:PORT'
            cand --rotate-days 'Move each connection to fresh queues about every DAYS days (0: only with `tern rotate`)'
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --no-passphrase 'Keep the profile key unencrypted on disk (no passphrase to type; anyone who can read the home directory can read the profile)'
            cand --isolate 'Give every queue a relay session and TCP connection of its own (and, with --proxy, its own SOCKS credentials), so nothing on the wire links two queues on one relay'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;invite'= {
            cand --name 'What to call the contact [default: their own name, once they accept]'
            cand --rekey 'Re-key an existing contact: replace the connection''s keys and queues with ones exchanged through this invitation (useless to anyone else)'
            cand --png 'Write the QR code to a PNG file'
            cand --expires 'Withdraw the invitation if nobody used it within DURATION (30m, 2h, 7d); see `tern invitations`'
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --qr 'Show a QR code on the terminal (the default when stdout is a terminal and the code fits it; refused, before anything is made, when it cannot fit)'
            cand --link 'Print the link (the default when stdout is not a terminal)'
            cand --force 'Replace the --png FILE if it exists'
            cand --json 'Print one JSON object (link, name, png) instead of the QR code or link'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;invitations'= {
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --json 'One JSON object per line'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
            cand list 'List them (the default)'
            cand revoke 'Withdraw one: delete its queues on the relays, so that nobody can use it'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'tern;invitations;list'= {
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --json 'One JSON object per line'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;invitations;revoke'= {
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --json 'One JSON object per line'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;invitations;help'= {
            cand list 'List them (the default)'
            cand revoke 'Withdraw one: delete its queues on the relays, so that nobody can use it'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'tern;invitations;help;list'= {
        }
        &'tern;invitations;help;revoke'= {
        }
        &'tern;invitations;help;help'= {
        }
        &'tern;accept'= {
            cand --image 'A PNG or JPEG picture (photo or screenshot) of the QR code'
            cand --name 'What to call the contact [default: contact-XXXXXX until the connection completes, then the name they give themselves]'
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --json 'Print one JSON object (contact, state) when the request is sent'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;send'= {
            cand --file 'Send a file (give it more than once for several; `-` reads standard input, with --name); the message words, if any, are its caption'
            cand --name 'The name the file goes by (required for `--file -`)'
            cand --stall 'With --file: give up on a relay that makes no progress for SECS (the upload resumes with `tern files retry`)'
            cand --wait-delivered 'Wait up to SECS (at most 86400) for a device of the contact to confirm it stored the message; exit 9 if none did in time'
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --json 'Print one JSON object: the message id and whether a relay has it'
            cand --lines 'Send each line of stdin as a message of its own, as it comes (a log tail, a CSV), in one process; empty lines are skipped'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;recv'= {
            cand --wait 'Wait up to SECS for the first message if none is waiting'
            cand --from 'Only this contact'
            cand --files-dir 'Where received files are saved [default: $XDG_DOWNLOAD_DIR/tern, or downloads/ in the profile]; never over another file'
            cand --max-file-size 'Offers of larger files are kept, not downloaded (`tern files get ID` takes one): a number of bytes, or with K, M, G [default: 100M]'
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --json 'One JSON object per line'
            cand --follow 'Keep receiving and printing as messages arrive, until interrupted'
            cand --fail-if-empty 'Exit with status 66 when no message arrived (for scripts: `tern recv --wait 60 --fail-if-empty || echo nothing`)'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;contacts'= {
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --json 'One JSON object per line'
            cand --long 'Several lines per contact: the name, status and avatar they sent, relays, rotation'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
            cand list 'List every contact (the default)'
            cand show 'One contact in the long form; optionally save the avatar they sent'
            cand rename 'Give a contact another name (only here: contacts never see it)'
            cand receipts 'Show, or turn on or off, the delivery receipts this device sends a contact (on by default; `tern profile --receipts off` turns them off for every contact). Off: that contact never sees "delivered"'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'tern;contacts;list'= {
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --json 'One JSON object per line'
            cand --long 'Several lines per contact: the name, status and avatar they sent, relays, rotation'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;contacts;show'= {
            cand --save-avatar 'Write the contact''s avatar (PNG or JPEG) to FILE'
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --json 'One JSON object per line'
            cand --long 'Several lines per contact: the name, status and avatar they sent, relays, rotation'
            cand --force 'Replace FILE if it exists'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;contacts;rename'= {
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;contacts;receipts'= {
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;contacts;help'= {
            cand list 'List every contact (the default)'
            cand show 'One contact in the long form; optionally save the avatar they sent'
            cand rename 'Give a contact another name (only here: contacts never see it)'
            cand receipts 'Show, or turn on or off, the delivery receipts this device sends a contact (on by default; `tern profile --receipts off` turns them off for every contact). Off: that contact never sees "delivered"'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'tern;contacts;help;list'= {
        }
        &'tern;contacts;help;show'= {
        }
        &'tern;contacts;help;rename'= {
        }
        &'tern;contacts;help;receipts'= {
        }
        &'tern;contacts;help;help'= {
        }
        &'tern;verify'= {
            cand --image 'A picture (photo or screenshot, PNG or JPEG) of the QR code that `tern verify` shows on the contact''s screen, to compare instead of digits'
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --json 'Print one JSON object: the code, or whether the codes match'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;profile'= {
            cand --name 'Your display name (1 to 64 bytes, no control or format characters)'
            cand --status 'A status line shown to contacts (up to 512 bytes; may span lines)'
            cand --avatar 'A PNG or JPEG of at most 11 KiB'
            cand --receipts 'Send delivery receipts from this device (on by default; a setting of each device): contacts see which of their messages it stored, never whether you read them. Off: no contact ever sees "delivered" from this device'
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --no-avatar 'Remove the avatar'
            cand --json 'Print the profile as one JSON object'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;log'= {
            cand --limit 'How many of the latest messages'
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --json 'One JSON object per line'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;files'= {
            cand --files-dir 'Where received files are saved [default: $XDG_DOWNLOAD_DIR/tern, or downloads/ in the profile]'
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --json 'One JSON object per line'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
            cand get 'Download an offered file, whatever its size'
            cand cancel 'Stop a file in or out and delete it from the relays'
            cand retry 'Go on with an upload or download that stopped'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'tern;files;get'= {
            cand --files-dir 'Where received files are saved [default: $XDG_DOWNLOAD_DIR/tern, or downloads/ in the profile]'
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --json 'One JSON object per line'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;files;cancel'= {
            cand --files-dir 'Where received files are saved [default: $XDG_DOWNLOAD_DIR/tern, or downloads/ in the profile]'
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --json 'One JSON object per line'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;files;retry'= {
            cand --stall 'Give up on a relay that makes no progress for this long'
            cand --files-dir 'Where received files are saved [default: $XDG_DOWNLOAD_DIR/tern, or downloads/ in the profile]'
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --json 'One JSON object per line'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;files;help'= {
            cand get 'Download an offered file, whatever its size'
            cand cancel 'Stop a file in or out and delete it from the relays'
            cand retry 'Go on with an upload or download that stopped'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'tern;files;help;get'= {
        }
        &'tern;files;help;cancel'= {
        }
        &'tern;files;help;retry'= {
        }
        &'tern;files;help;help'= {
        }
        &'tern;forget'= {
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --yes 'Do not ask for confirmation (needed when stdin is not a terminal)'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;relays'= {
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --json 'One JSON object per line (list and test)'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
            cand list 'List your relays (the default)'
            cand add 'Add a relay for new connections (after checking that it answers as the key in its address)'
            cand remove 'Stop using a relay for new connections; connections that receive through it move to your other relays'
            cand test 'Check that each relay answers and holds the key its address names'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'tern;relays;list'= {
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --json 'One JSON object per line (list and test)'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;relays;add'= {
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --no-test 'Add it without asking it first (a relay that is not up yet)'
            cand --json 'One JSON object per line (list and test)'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;relays;remove'= {
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --json 'One JSON object per line (list and test)'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;relays;test'= {
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --json 'One JSON object per line (list and test)'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;relays;help'= {
            cand list 'List your relays (the default)'
            cand add 'Add a relay for new connections (after checking that it answers as the key in its address)'
            cand remove 'Stop using a relay for new connections; connections that receive through it move to your other relays'
            cand test 'Check that each relay answers and holds the key its address names'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'tern;relays;help;list'= {
        }
        &'tern;relays;help;add'= {
        }
        &'tern;relays;help;remove'= {
        }
        &'tern;relays;help;test'= {
        }
        &'tern;relays;help;help'= {
        }
        &'tern;rotate'= {
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --all 'Every connected contact'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;key'= {
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
            cand export 'Write the unlocked identity to a file (mode 0600) for scripts and cron jobs: with --identity FILE, commands skip the slow passphrase step'
            cand passwd 'Change the passphrase (or remove it with --no-passphrase); with --rekey, also move the whole profile to a new key'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'tern;key;export'= {
            cand --out 'Where to write the identity (missing directories are made, 0700)'
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --force 'Replace FILE if it exists'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;key;passwd'= {
            cand --new-passphrase-file 'Read the new passphrase from the first line of FILE instead of asking twice on the terminal (the current one still comes from TERN_PASSPHRASE_FILE, --passphrase-file or a prompt)'
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --no-passphrase 'Keep the profile key unencrypted on disk from now on'
            cand --rekey 'Re-key: a new profile key, with every record re-encrypted under it in one transaction. Old copies of key.age and every identity exported before stop opening the profile (export again after); contacts notice nothing. The new passphrase may equal the old'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;key;help'= {
            cand export 'Write the unlocked identity to a file (mode 0600) for scripts and cron jobs: with --identity FILE, commands skip the slow passphrase step'
            cand passwd 'Change the passphrase (or remove it with --no-passphrase); with --rekey, also move the whole profile to a new key'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'tern;key;help;export'= {
        }
        &'tern;key;help;passwd'= {
        }
        &'tern;key;help;help'= {
        }
        &'tern;device'= {
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
            cand link 'Show a one-time device link (QR code or text) for a new device'
            cand confirm 'Link the device that answered a device link shown without --wait'
            cand revoke 'Withdraw a device link nobody should use any more'
            cand join 'On the new device: join a profile with a device link'
            cand list 'List this profile''s devices'
            cand remove 'Cut a device off: it receives nothing new, even if lost or hostile'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'tern;device;link'= {
            cand --name 'Name this device (default: its host name, or the name it has)'
            cand --png 'Write the QR code to a PNG file'
            cand --wait 'Then wait up to SECS for the new device to join and link it (without this, confirm the new device afterwards with `tern device confirm`); a link nobody answered meanwhile is withdrawn'
            cand --expires 'How long the link stays usable (30s, 10m, 1h; at most 24h)'
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --qr 'Show a QR code on the terminal (the default on a terminal)'
            cand --link 'Print the link as text'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;device;confirm'= {
            cand --wait 'Then wait up to SECS for the new device to finish joining'
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --yes 'Do not ask (needed when stdin is not a terminal)'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;device;revoke'= {
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;device;join'= {
            cand --image 'Read the QR code from a picture (PNG or JPEG)'
            cand --name 'This device''s name among your devices (default: its host name)'
            cand --relay 'A relay for this device''s first queues (repeat), when the linking device''s relays need an access key (tern://KEY:ACCESS@HOST:PORT); the profile''s relay list replaces it once linked'
            cand --wait 'Then wait up to SECS for the profile, contacts and history (instead of running `tern recv` by hand)'
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --no-passphrase 'For a new --home: keep the profile key unencrypted on disk'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;device;list'= {
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --json 'One JSON object per line'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;device;remove'= {
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;device;help'= {
            cand link 'Show a one-time device link (QR code or text) for a new device'
            cand confirm 'Link the device that answered a device link shown without --wait'
            cand revoke 'Withdraw a device link nobody should use any more'
            cand join 'On the new device: join a profile with a device link'
            cand list 'List this profile''s devices'
            cand remove 'Cut a device off: it receives nothing new, even if lost or hostile'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'tern;device;help;link'= {
        }
        &'tern;device;help;confirm'= {
        }
        &'tern;device;help;revoke'= {
        }
        &'tern;device;help;join'= {
        }
        &'tern;device;help;list'= {
        }
        &'tern;device;help;remove'= {
        }
        &'tern;device;help;help'= {
        }
        &'tern;daemon'= {
            cand --socket 'The socket to listen on [default: $XDG_RUNTIME_DIR/tern/ID.sock, or daemon.sock in the (first) profile]; its directory must be private'
            cand --files-dir 'Where received files are saved [default: $XDG_DOWNLOAD_DIR/tern, or downloads/ in each profile]; never over another file'
            cand --max-file-size 'Offers of larger files are kept, not downloaded (the method `file_get` takes one): a number of bytes, or with K, M, G [default: 100M]'
            cand --homes-dir 'Serve every profile in this directory (each subdirectory holding one, as `tern init --home DIR/NAME` makes it), beside any --home; profiles added later are served after a restart'
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --manual-ack 'Keep each received message pending (and send it again to every client that subscribes) until a client acknowledges it with `ack`'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;jsonrpc'= {
            cand --files-dir 'Where received files are saved [default: $XDG_DOWNLOAD_DIR/tern, or downloads/ in each profile]; never over another file'
            cand --max-file-size 'Offers of larger files are kept, not downloaded (the method `file_get` takes one): a number of bytes, or with K, M, G [default: 100M]'
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --manual-ack 'Keep each received message pending until it is acknowledged with `ack`'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;relay'= {
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
            cand serve 'Serve until SIGTERM or SIGINT; prints the relay''s address on the first line of stdout'
            cand address 'Print the address of the relay in --data (or in the --store database)'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'tern;relay;serve'= {
            cand --data 'Where the relay keeps its identity key and queues [default: $XDG_DATA_HOME/tern-relay or ~/.local/share/tern-relay]'
            cand --access-key-file 'A file of access keys needed to create queues (sending never needs one): one key a line, optionally followed by the most queues it may have; the first key becomes part of the address you hand out'
            cand --listen 'Address and port to listen on; the PORT environment variable, as set by container platforms, overrides the port'
            cand --store 'Keep the queues and the identity key in this PostgreSQL database (postgres://USER:PASSWORD@HOST:PORT/DATABASE) instead of SQLite under --data; every relay started with the same database serves as one relay. DATABASE_URL, as PaaS add-ons set it, is read when not given'
            cand --ttl-days 'Delete undelivered messages after this many days; a queue unused for as long is deleted too'
            cand --max-pending 'Most messages waiting in one queue; senders get "queue full" past it'
            cand --max-connections 'Most simultaneous connections'
            cand --max-connections-per-address 'Most simultaneous connections from one address (an IPv6 /64)'
            cand --max-data-mib 'Beyond this database size, in MiB, new queues and messages are refused ("temporarily unavailable") until deliveries make room'
            cand --max-open-queues 'Most queues created without an access key, in all'
            cand --unsecured-days 'Days a queue that was never secured lives: an invitation must be answered within it (0: no limit of its own; like every queue it still goes once unused for --ttl-days)'
            cand --public-address 'The host clients reach this relay at, when it is not the listen address: HOST[:PORT] (behind NAT, on 0.0.0.0), or https://HOST[:PORT][/PATH] behind an HTTPS front; remembered in --data for `tern relay address`'
            cand --forwarded-header 'Behind a reverse proxy or PaaS router you trust: the header it puts the client''s address in (X-Forwarded-For), so that the per-address limits count clients rather than the front'
            cand --workers 'Threads that run handshakes and execute commands'
            cand --create-rate-per-connection 'Queues one connection may create: BURST/PER_MINUTE'
            cand --create-rate-per-address 'Queues one address (an IPv6 /64) may create: BURST/PER_MINUTE'
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;relay;address'= {
            cand --data 'Where the relay keeps its identity key and queues [default: $XDG_DATA_HOME/tern-relay or ~/.local/share/tern-relay]'
            cand --access-key-file 'A file of access keys needed to create queues (sending never needs one): one key a line, optionally followed by the most queues it may have; the first key becomes part of the address you hand out'
            cand --listen 'Address and port to listen on; the PORT environment variable, as set by container platforms, overrides the port'
            cand --store 'Keep the queues and the identity key in this PostgreSQL database (postgres://USER:PASSWORD@HOST:PORT/DATABASE) instead of SQLite under --data; every relay started with the same database serves as one relay. DATABASE_URL, as PaaS add-ons set it, is read when not given'
            cand --public-address 'With --store: the host clients reach the relay at, HOST[:PORT] or https://HOST[:PORT][/PATH] (a database remembers no address; a relay under --data remembers the one it printed)'
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;relay;help'= {
            cand serve 'Serve until SIGTERM or SIGINT; prints the relay''s address on the first line of stdout'
            cand address 'Print the address of the relay in --data (or in the --store database)'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'tern;relay;help;serve'= {
        }
        &'tern;relay;help;address'= {
        }
        &'tern;relay;help;help'= {
        }
        &'tern;generate'= {
            cand --out 'Directory to write man/ and completions/ into'
            cand --home 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles'
            cand --passphrase-file 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)'
            cand --identity 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)'
            cand --proxy 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)'
            cand --allow-weak-passphrase 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'tern;help'= {
            cand init 'Create a profile: display name, relays, and the passphrase that protects it'
            cand invite 'Make a one-time invitation: a QR code to show, a link or a PNG file'
            cand invitations 'List the invitations and device links nobody has used yet, or withdraw one'
            cand accept 'Accept an invitation given as a link, on stdin, or as a picture of its QR code'
            cand send 'Send a message: from the arguments, or from stdin when there are none'
            cand recv 'Receive messages from every contact (and complete pending connections)'
            cand contacts 'List contacts: state, security level, post-quantum protection, relays and last activity'
            cand verify 'Show a contact''s security code, or compare it with theirs'
            cand profile 'Show or change your profile; changes are sent to connected contacts'
            cand log 'Show the local history with a contact, oldest first'
            cand files 'Files in and out'
            cand forget 'Delete a contact on all your devices: its queues, keys and history'
            cand relays 'List, add, remove or test your relays'
            cand rotate 'Move connections to fresh queues and keys (both directions)'
            cand key 'Manage the key that protects the profile'
            cand device 'Link, list and remove the devices that share this profile'
            cand daemon 'Serve profiles to bots and scripts: JSON-RPC 2.0 on a Unix socket'
            cand jsonrpc 'Serve the daemon''s JSON-RPC 2.0 on stdin and stdout, for programs that spawn tern'
            cand relay 'Run a relay, or print the address users add with `tern init --relay`'
            cand generate 'Write man pages and shell completions'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'tern;help;init'= {
        }
        &'tern;help;invite'= {
        }
        &'tern;help;invitations'= {
            cand list 'List them (the default)'
            cand revoke 'Withdraw one: delete its queues on the relays, so that nobody can use it'
        }
        &'tern;help;invitations;list'= {
        }
        &'tern;help;invitations;revoke'= {
        }
        &'tern;help;accept'= {
        }
        &'tern;help;send'= {
        }
        &'tern;help;recv'= {
        }
        &'tern;help;contacts'= {
            cand list 'List every contact (the default)'
            cand show 'One contact in the long form; optionally save the avatar they sent'
            cand rename 'Give a contact another name (only here: contacts never see it)'
            cand receipts 'Show, or turn on or off, the delivery receipts this device sends a contact (on by default; `tern profile --receipts off` turns them off for every contact). Off: that contact never sees "delivered"'
        }
        &'tern;help;contacts;list'= {
        }
        &'tern;help;contacts;show'= {
        }
        &'tern;help;contacts;rename'= {
        }
        &'tern;help;contacts;receipts'= {
        }
        &'tern;help;verify'= {
        }
        &'tern;help;profile'= {
        }
        &'tern;help;log'= {
        }
        &'tern;help;files'= {
            cand get 'Download an offered file, whatever its size'
            cand cancel 'Stop a file in or out and delete it from the relays'
            cand retry 'Go on with an upload or download that stopped'
        }
        &'tern;help;files;get'= {
        }
        &'tern;help;files;cancel'= {
        }
        &'tern;help;files;retry'= {
        }
        &'tern;help;forget'= {
        }
        &'tern;help;relays'= {
            cand list 'List your relays (the default)'
            cand add 'Add a relay for new connections (after checking that it answers as the key in its address)'
            cand remove 'Stop using a relay for new connections; connections that receive through it move to your other relays'
            cand test 'Check that each relay answers and holds the key its address names'
        }
        &'tern;help;relays;list'= {
        }
        &'tern;help;relays;add'= {
        }
        &'tern;help;relays;remove'= {
        }
        &'tern;help;relays;test'= {
        }
        &'tern;help;rotate'= {
        }
        &'tern;help;key'= {
            cand export 'Write the unlocked identity to a file (mode 0600) for scripts and cron jobs: with --identity FILE, commands skip the slow passphrase step'
            cand passwd 'Change the passphrase (or remove it with --no-passphrase); with --rekey, also move the whole profile to a new key'
        }
        &'tern;help;key;export'= {
        }
        &'tern;help;key;passwd'= {
        }
        &'tern;help;device'= {
            cand link 'Show a one-time device link (QR code or text) for a new device'
            cand confirm 'Link the device that answered a device link shown without --wait'
            cand revoke 'Withdraw a device link nobody should use any more'
            cand join 'On the new device: join a profile with a device link'
            cand list 'List this profile''s devices'
            cand remove 'Cut a device off: it receives nothing new, even if lost or hostile'
        }
        &'tern;help;device;link'= {
        }
        &'tern;help;device;confirm'= {
        }
        &'tern;help;device;revoke'= {
        }
        &'tern;help;device;join'= {
        }
        &'tern;help;device;list'= {
        }
        &'tern;help;device;remove'= {
        }
        &'tern;help;daemon'= {
        }
        &'tern;help;jsonrpc'= {
        }
        &'tern;help;relay'= {
            cand serve 'Serve until SIGTERM or SIGINT; prints the relay''s address on the first line of stdout'
            cand address 'Print the address of the relay in --data (or in the --store database)'
        }
        &'tern;help;relay;serve'= {
        }
        &'tern;help;relay;address'= {
        }
        &'tern;help;generate'= {
        }
        &'tern;help;help'= {
        }
    ]
    $completions[$command]
}
