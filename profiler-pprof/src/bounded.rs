//! Decoding untrusted profiles within a memory bound.
//!
//! A protobuf `Profile` can be far larger in memory than on the wire: an
//! empty `Sample` is 2 bytes on the wire and 72 in memory, a packed location
//! id is 1 byte on the wire and 8 in memory. So before decoding, one pass over
//! the wire format counts what decoding would allocate and refuses profiles
//! over the limits. The pass reads varints and lengths only; it is written
//! here rather than on prost's `encoding` module, which prost marks as
//! internal (`doc(hidden)`), so a prost upgrade cannot break it silently.

use std::mem::size_of;

use prost::Message;

use crate::{Error, Function, Label, Line, Location, Mapping, Profile, Sample, ValueType};

/// What decoding one profile may cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest profile after gunzip, bytes.
    pub max_decompressed_bytes: usize,
    /// Largest estimated memory of the decoded profile, bytes.
    pub max_decoded_bytes: usize,
    pub max_samples: usize,
    /// Longest string (function or file name, label) accepted.
    pub max_string_len: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_decompressed_bytes: 32 << 20,
            max_decoded_bytes: 128 << 20,
            max_samples: 2_000_000,
            max_string_len: 64 << 10,
        }
    }
}

/// Decodes a gzip-compressed (or raw) profile from an untrusted source:
/// bombs, amplification and malformed input are errors, not allocations.
pub fn decode_gzip_within(bytes: &[u8], limits: &DecodeLimits) -> Result<Profile, Error> {
    let raw = crate::gunzip(bytes, limits.max_decompressed_bytes)?;
    check_cost(&raw, limits)?;
    Ok(Profile::decode(raw.as_ref())?)
}

/// What decoding a profile would allocate, found on the wire.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DecodedCost {
    pub bytes: usize,
    pub samples: usize,
    pub longest_string: usize,
}

impl DecodedCost {
    pub fn within(&self, limits: &DecodeLimits) -> Result<(), Error> {
        let refuse = |what: String| Err(Error::TooLarge { what });
        if self.samples > limits.max_samples {
            return refuse(format!(
                "{} samples (limit {})",
                self.samples, limits.max_samples
            ));
        }
        if self.longest_string > limits.max_string_len {
            return refuse(format!(
                "a string of {} bytes (limit {})",
                self.longest_string, limits.max_string_len
            ));
        }
        if self.bytes > limits.max_decoded_bytes {
            return refuse(format!(
                "over {} MiB once decoded (the limit)",
                limits.max_decoded_bytes >> 20
            ));
        }
        Ok(())
    }
}

/// Upper bound of what `Profile::decode` allocates for `wire`.
pub fn decoded_cost(wire: &[u8]) -> Result<DecodedCost, Error> {
    scan(wire, None)
}

/// The cost of decoding `wire` if it is within `limits`; the scan stops at
/// the first field past a limit, so a bomb costs little to refuse.
pub fn check_cost(wire: &[u8], limits: &DecodeLimits) -> Result<DecodedCost, Error> {
    let cost = scan(wire, Some(limits))?;
    cost.within(limits)?;
    Ok(cost)
}

fn scan(wire: &[u8], stop_past: Option<&DecodeLimits>) -> Result<DecodedCost, Error> {
    let mut cost = DecodedCost::default();
    let mut bytes = 0usize;
    for field in Fields(wire) {
        if let Some(limits) = stop_past {
            cost.bytes = bytes.saturating_mul(2);
            if cost.within(limits).is_err() {
                return Ok(cost);
            }
        }
        let (number, value) = field?;
        bytes = bytes.saturating_add(match (number, value) {
            (1 | 11, _) => size_of::<ValueType>(),
            (2, Value::Bytes(sample)) => {
                cost.samples += 1;
                size_of::<Sample>().saturating_add(sample_cost(sample)?)
            }
            (3, _) => size_of::<Mapping>(),
            (4, Value::Bytes(location)) => size_of::<Location>()
                .saturating_add(count_field(location, 4)?.saturating_mul(size_of::<Line>())),
            (5, _) => size_of::<Function>(),
            (6, Value::Bytes(s)) => {
                cost.longest_string = cost.longest_string.max(s.len());
                size_of::<String>() + s.len()
            }
            (13, v) => v.scalars().saturating_mul(8),
            _ => 0,
        });
    }
    // Repeated fields grow by doubling: up to twice the elements' size.
    cost.bytes = bytes.saturating_mul(2);
    Ok(cost)
}

/// Upper bound of what decoding a Pyroscope `PushRequest` allocates, found on the wire:
/// each series, label and sample with the bytes of its strings and raw profile, twice
/// (repeated fields grow by doubling). An empty series is 2 bytes on the wire and
/// about 50 in memory: 32 KB of gzip held 16 million of them, 3 GB decoded. The raw
/// profiles are decoded later, one at a time, each within its own limits.
pub fn push_request_cost(wire: &[u8]) -> Result<usize, Error> {
    use crate::pyroscope::push::v1::{RawProfileSeries, RawSample};
    use crate::pyroscope::types::v1::LabelPair;
    let mut bytes = 0usize;
    for field in Fields(wire) {
        if let (1, Value::Bytes(series)) = field? {
            bytes = bytes.saturating_add(size_of::<RawProfileSeries>());
            for field in Fields(series) {
                bytes = bytes.saturating_add(match field? {
                    (1, Value::Bytes(label)) => size_of::<LabelPair>() + label.len(),
                    (2, Value::Bytes(sample)) => size_of::<RawSample>() + sample.len(),
                    _ => 0,
                });
            }
        }
    }
    Ok(bytes.saturating_mul(2))
}

fn sample_cost(sample: &[u8]) -> Result<usize, Error> {
    let mut bytes = 0usize;
    for field in Fields(sample) {
        let (number, value) = field?;
        bytes = bytes.saturating_add(match number {
            1 | 2 => value.scalars().saturating_mul(8),
            3 => size_of::<Label>(),
            _ => 0,
        });
    }
    Ok(bytes)
}

/// How many times field `number` occurs in a message.
fn count_field(message: &[u8], number: u32) -> Result<usize, Error> {
    let mut n = 0;
    for field in Fields(message) {
        if field?.0 == number {
            n += 1;
        }
    }
    Ok(n)
}

enum Value<'a> {
    Scalar,
    Bytes(&'a [u8]),
}

impl Value<'_> {
    /// Elements of a repeated scalar field: one if unpacked, one per varint
    /// (a byte without the continuation bit) if packed.
    fn scalars(&self) -> usize {
        match self {
            Value::Scalar => 1,
            Value::Bytes(b) => b.iter().filter(|&&x| x & 0x80 == 0).count(),
        }
    }
}

/// Top-level fields of a protobuf message: (field number, value).
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Value<'a>), Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        Some(self.field().inspect_err(|_| self.0 = &[]))
    }
}

impl<'a> Fields<'a> {
    fn field(&mut self) -> Result<(u32, Value<'a>), Error> {
        let key = self.varint()?;
        let number = u32::try_from(key >> 3).map_err(|_| malformed())?;
        let value = match key & 7 {
            0 => {
                self.varint()?;
                Value::Scalar
            }
            1 => {
                self.take(8)?;
                Value::Scalar
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| malformed())?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Value::Scalar
            }
            _ => return Err(malformed()),
        };
        Ok((number, value))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.0.len() < n {
            return Err(malformed());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn varint(&mut self) -> Result<u64, Error> {
        let mut value = 0u64;
        for i in 0..10 {
            let byte = *self.0.get(i).ok_or_else(malformed)?;
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                self.0 = &self.0[i + 1..];
                return Ok(value);
            }
        }
        Err(malformed())
    }
}

fn malformed() -> Error {
    Error::Invalid("malformed protobuf".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::from_folded;

    fn stacks() -> Vec<(Vec<String>, i64)> {
        (0..50)
            .map(|i| {
                (
                    vec!["main".to_string(), format!("f{i}"), "leaf".to_string()],
                    i + 1,
                )
            })
            .collect()
    }

    #[test]
    fn estimate_bounds_real_decoding_and_accepts_normal_profiles() {
        let p = from_folded(&stacks(), "cpu", "nanoseconds", 10_000_000);
        let wire = p.encode_to_vec();
        let cost = decoded_cost(&wire).unwrap();
        assert_eq!(cost.samples, 50);
        let actual =
            size_of::<Sample>() * 50 + p.string_table.iter().map(|s| s.len()).sum::<usize>();
        assert!(cost.bytes >= actual, "{cost:?} < {actual}");
        let back = decode_gzip_within(&crate::encode_gzip(&p), &DecodeLimits::default()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn amplification_is_refused_before_decoding() {
        // 1M empty samples: 2 MB on the wire, about 72 MB decoded.
        let mut wire = Vec::new();
        for _ in 0..1_000_000 {
            wire.extend_from_slice(&[0x12, 0x00]);
        }
        let limits = DecodeLimits {
            max_decoded_bytes: 16 << 20,
            ..DecodeLimits::default()
        };
        let err = decode_gzip_within(&wire, &limits).unwrap_err();
        assert!(matches!(err, Error::TooLarge { .. }), "{err}");
        let limits = DecodeLimits {
            max_samples: 1000,
            ..DecodeLimits::default()
        };
        assert!(decode_gzip_within(&wire, &limits)
            .unwrap_err()
            .to_string()
            .contains("1001 samples (limit 1000)"));

        // One sample with 4M packed location ids: 4 MB on the wire, 32 MB decoded.
        let ids = vec![1u8; 4 << 20];
        let mut sample = vec![0x0a];
        put_varint(&mut sample, ids.len() as u64);
        sample.extend_from_slice(&ids);
        let mut wire = vec![0x12];
        put_varint(&mut wire, sample.len() as u64);
        wire.extend_from_slice(&sample);
        let cost = decoded_cost(&wire).unwrap();
        assert!(cost.bytes >= 32 << 20, "{cost:?}");
    }

    #[test]
    fn huge_strings_are_refused() {
        let mut p = from_folded(&stacks(), "cpu", "nanoseconds", 1);
        p.string_table.push("x".repeat(100_000));
        let err =
            decode_gzip_within(&crate::encode_gzip(&p), &DecodeLimits::default()).unwrap_err();
        assert!(
            err.to_string().contains("a string of 100000 bytes"),
            "{err}"
        );
    }

    #[test]
    fn malformed_wire_is_an_error() {
        assert!(
            decoded_cost(&[0x12, 0x05, 0x00]).is_err(),
            "length past the end"
        );
        assert!(decoded_cost(&[0xff; 11]).is_err(), "varint over 10 bytes");
        assert!(decoded_cost(&[0x0b]).is_err(), "group wire type");
    }

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push(v as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
}
