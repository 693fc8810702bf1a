//! Operator log lines on stderr: `LEVEL message`.
//!
//! Deliberately tiny: the relay logs a handful of lifecycle events and
//! failures, never anything about a request (no ids, keys, addresses of
//! clients or message bytes), so a logging framework would buy nothing.

use std::fmt;
use std::io::Write;

#[derive(Debug, Clone, Copy)]
pub(crate) enum Level {
    Info,
    Warn,
    Error,
}

pub(crate) fn write(level: Level, args: fmt::Arguments<'_>) {
    let tag = match level {
        Level::Info => "INFO",
        Level::Warn => "WARN",
        Level::Error => "ERROR",
    };
    // One write of a whole line, so lines from different threads do not
    // interleave. Not eprint!: it panics when stderr is a closed pipe, and a
    // log line is not worth a crash.
    let line = format!("{tag} {args}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

macro_rules! info {
    ($($t:tt)*) => { $crate::log::write($crate::log::Level::Info, format_args!($($t)*)) };
}
macro_rules! warning {
    ($($t:tt)*) => { $crate::log::write($crate::log::Level::Warn, format_args!($($t)*)) };
}
macro_rules! error {
    ($($t:tt)*) => { $crate::log::write($crate::log::Level::Error, format_args!($($t)*)) };
}
pub(crate) use {error, info, warning};
