//! A tiny big-endian reader and writer for tern's fixed binary layouts.
//!
//! Every structure on tern's wire is a concatenation of fixed-size fields and
//! short length-prefixed strings, so a cursor over a byte slice is all the
//! parsing machinery needed; anything malformed becomes [`CodecError`].

use thiserror::Error;

/// Why a byte string could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    #[error("input is truncated")]
    Truncated,
    #[error("unexpected trailing data")]
    Trailing,
    #[error("padding is not all zero")]
    BadPadding,
    #[error("invalid value for {0}")]
    Invalid(&'static str),
}

/// Reads fields from the front of a byte slice.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.buf.len() < n {
            return Err(CodecError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.bytes(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A string of at most 255 bytes prefixed by its length in one byte.
    pub fn short_bytes(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.u8()? as usize;
        self.bytes(n)
    }

    /// A string of at most 2^32-1 bytes prefixed by its length in four bytes.
    pub fn long_bytes(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.u32()? as usize;
        self.bytes(n)
    }

    /// The rest must be empty.
    pub fn finish(self) -> Result<(), CodecError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(CodecError::Trailing)
        }
    }

    /// The rest must be zero bytes: fixed-size blocks are padded with zeros,
    /// and anything else there is a sign of tampering or a bug.
    pub fn finish_padding(self) -> Result<(), CodecError> {
        // Not secret, but checking every byte keeps the cost independent of content.
        if self.buf.iter().fold(0u8, |acc, b| acc | b) == 0 {
            Ok(())
        } else {
            Err(CodecError::BadPadding)
        }
    }
}

/// Appends fields to a growing buffer.
#[derive(Debug, Default, Clone)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
        }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_be_bytes())
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_be_bytes())
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_be_bytes())
    }

    /// Panics if `b` is longer than 255 bytes: callers validate lengths first.
    pub fn short_bytes(&mut self, b: &[u8]) -> &mut Self {
        let n = u8::try_from(b.len()).expect("short string longer than 255 bytes");
        self.u8(n).bytes(b)
    }

    pub fn long_bytes(&mut self, b: &[u8]) -> &mut Self {
        let n = u32::try_from(b.len()).expect("string longer than 4 GiB");
        self.u32(n).bytes(b)
    }

    /// Zero-fills up to `len`; `None` when the content is already longer.
    pub fn pad_to(mut self, len: usize) -> Option<Vec<u8>> {
        if self.buf.len() > len {
            return None;
        }
        self.buf.resize(len, 0);
        Some(self.buf)
    }

    pub fn into_vec(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut w = Writer::new();
        w.u8(7)
            .u16(0x0102)
            .u32(3)
            .u64(4)
            .short_bytes(b"abc")
            .long_bytes(b"xy");
        let v = w.pad_to(40).unwrap();
        let mut r = Reader::new(&v);
        assert_eq!(r.u8().unwrap(), 7);
        assert_eq!(r.u16().unwrap(), 0x0102);
        assert_eq!(r.u32().unwrap(), 3);
        assert_eq!(r.u64().unwrap(), 4);
        assert_eq!(r.short_bytes().unwrap(), b"abc");
        assert_eq!(r.long_bytes().unwrap(), b"xy");
        r.finish_padding().unwrap();
    }

    #[test]
    fn truncation_and_padding_errors() {
        assert_eq!(Reader::new(&[1]).u16(), Err(CodecError::Truncated));
        assert_eq!(
            Reader::new(&[5, 1]).short_bytes(),
            Err(CodecError::Truncated)
        );
        assert_eq!(
            Reader::new(&[0, 1]).finish_padding(),
            Err(CodecError::BadPadding)
        );
        assert_eq!(Reader::new(&[0]).finish(), Err(CodecError::Trailing));
    }
}
