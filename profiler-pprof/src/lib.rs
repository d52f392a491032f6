//! Every profile format and rendering the agent and the server share, so
//! that each rule lives once: pprof (profile.proto) types and codecs, with
//! bounded decoding of untrusted input; Grafana Pyroscope's API messages in
//! [`pyroscope`]; OTLP profiles converted to pprof in `otlp` (feature
//! `otlp`: only the server takes them); kind names and the `[kind]` root
//! frame in [`kind`]; folded text and its one frame escaping rule in
//! [`folded`]; the hot/cold SVG and its colours in [`flamegraph`].
//!
//! Stacks cross this crate's API root-first (`main;work;leaf`), the way folded
//! files and flame graphs read; pprof itself stores location ids leaf-first,
//! so the conversion lives here and nowhere else.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{Read, Write};

use prost::Message;

/// Generated from `proto/profile.proto`.
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/perftools.profiles.rs"));
}

/// Grafana Pyroscope's API messages, generated from `proto/{types,push,querier}/v1`
/// (modules follow the proto packages, which the generated code relies on).
pub mod pyroscope {
    pub mod types {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/types.v1.rs"));
        }
    }
    pub mod push {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/push.v1.rs"));
        }
    }
    pub mod querier {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/querier.v1.rs"));
        }
    }
}

pub use proto::{Function, Label, Line, Location, Mapping, Profile, Sample, ValueType};

mod bounded;
#[cfg(feature = "otlp")]
pub mod otlp;
pub use bounded::{check_cost, decode_gzip_within, decoded_cost, push_request_cost, DecodeLimits, DecodedCost};

pub mod compare;
pub mod flamegraph;
pub mod folded;
pub mod kind;
pub mod runs;
pub mod stacks;
pub mod waits;


#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("gzip stream is corrupt or truncated: {0}")]
    Gzip(std::io::Error),
    #[error("profile is too large: {what}")]
    TooLarge { what: String },
    #[error("invalid protobuf: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("invalid profile: {0}")]
    Invalid(String),
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Decodes a gzip-compressed (or, lacking the gzip magic, raw) profile.
///
/// `max_decompressed` bounds memory use against decompression bombs: reading
/// stops one byte past the limit, so a bomb costs at most `limit` bytes.
pub fn decode_gzip(bytes: &[u8], max_decompressed: usize) -> Result<Profile, Error> {
    Ok(Profile::decode(gunzip(bytes, max_decompressed)?.as_ref())?)
}

/// Decodes an uncompressed profile; for untrusted input check
/// [`decoded_cost`] first.
pub fn decode(raw: &[u8]) -> Result<Profile, Error> {
    Ok(Profile::decode(raw)?)
}

/// The bytes of a gzip stream, or `bytes` themselves without the gzip magic,
/// refusing more than `max` bytes either way.
pub fn gunzip(bytes: &[u8], max: usize) -> Result<std::borrow::Cow<'_, [u8]>, Error> {
    let too_large = || Error::TooLarge {
        what: format!("more than {max} bytes after decompression"),
    };
    if !bytes.starts_with(&GZIP_MAGIC) {
        if bytes.len() > max {
            return Err(too_large());
        }
        return Ok(bytes.into());
    }
    let mut out = Vec::new();
    // MultiGzDecoder: `gzip a b > c` style concatenated members are valid gzip.
    flate2::read::MultiGzDecoder::new(bytes)
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(Error::Gzip)?;
    if out.len() > max {
        return Err(too_large());
    }
    Ok(out.into())
}

/// Serializes and gzips a profile, as `go tool pprof` expects on disk.
/// A label name both sides accept: ASCII letters, digits and `_ . / -`. No
/// `:`, which separates name and value in the ingest query (`label=name:value`)
/// and in the agent's configuration, so a name with one could not round-trip.
pub fn is_label_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-'))
}

pub fn encode_gzip(profile: &Profile) -> Vec<u8> {
    gzip(&profile.encode_to_vec())
}

pub fn gzip(raw: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(raw.len() / 4 + 64),
        flate2::Compression::default(),
    );
    enc.write_all(raw).expect("writing to a Vec cannot fail");
    enc.finish().expect("writing to a Vec cannot fail")
}

/// Builds a profile from root-first stacks, deduplicating strings, functions
/// and locations (one location per distinct function name: the builder has
/// no addresses, so a name is the identity).
pub struct ProfileBuilder {
    profile: Profile,
    strings: HashMap<String, i64>,
    locations: HashMap<i64, u64>,
}

impl ProfileBuilder {
    /// `sample_types` are (type, unit) pairs, one per value of each sample.
    pub fn new(sample_types: &[(&str, &str)]) -> Self {
        let mut b = ProfileBuilder {
            profile: Profile::default(),
            strings: HashMap::new(),
            locations: HashMap::new(),
        };
        b.intern("");
        for (ty, unit) in sample_types {
            let vt = b.value_type(ty, unit);
            b.profile.sample_type.push(vt);
        }
        b
    }

    /// Sets the sampling period, e.g. ("cpu", "nanoseconds", 10_000_000) for 100 Hz.
    pub fn period(mut self, ty: &str, unit: &str, period: i64) -> Self {
        self.profile.period_type = Some(self.value_type(ty, unit));
        self.profile.period = period;
        self
    }

    pub fn time(mut self, time_nanos: i64, duration_nanos: i64) -> Self {
        self.profile.time_nanos = time_nanos;
        self.profile.duration_nanos = duration_nanos;
        self
    }

    /// Adds one sample; `frames` are root-first, `labels` are string labels.
    pub fn add<S: AsRef<str>>(&mut self, frames: &[S], values: &[i64], labels: &[(&str, &str)]) {
        let location_id = frames
            .iter()
            .rev()
            .map(|f| self.location(f.as_ref()))
            .collect();
        let label = labels
            .iter()
            .map(|(k, v)| Label {
                key: self.intern(k),
                str: self.intern(v),
                ..Label::default()
            })
            .collect();
        self.profile.sample.push(Sample {
            location_id,
            value: values.to_vec(),
            label,
        });
    }

    pub fn build(self) -> Profile {
        self.profile
    }

    fn intern(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.profile.string_table.len() as i64;
        self.profile.string_table.push(s.to_owned());
        self.strings.insert(s.to_owned(), i);
        i
    }

    fn value_type(&mut self, ty: &str, unit: &str) -> ValueType {
        ValueType {
            r#type: self.intern(ty),
            unit: self.intern(unit),
        }
    }

    fn location(&mut self, name: &str) -> u64 {
        let source = source_of(name);
        let name = self.intern(name);
        if let Some(&id) = self.locations.get(&name) {
            return id;
        }
        let (filename, line) = match source {
            Some((file, line)) => (self.intern(file), line),
            None => (0, 0),
        };
        // Ids are 1-based: 0 means "unset" in profile.proto.
        let id = self.profile.function.len() as u64 + 1;
        self.profile.function.push(Function {
            id,
            name,
            system_name: name,
            filename,
            ..Function::default()
        });
        self.profile.location.push(Location {
            id,
            line: vec![Line {
                function_id: id,
                line,
                ..Line::default()
            }],
            ..Location::default()
        });
        self.locations.insert(name, id);
        id
    }
}

/// The file and line a frame named like `function (file.py:42)` (the agent's Python
/// frames) gives. The name stays whole in the profile, so stacks read back the same; the
/// source fields are for tools that show them (`go tool pprof -lines`, editors).
pub fn source_of(name: &str) -> Option<(&str, i64)> {
    let inner = name.strip_suffix(')')?;
    let open = inner.rfind(" (")?;
    let (file, line) = inner[open + 2..].rsplit_once(':')?;
    let line = line.parse().ok().filter(|&n: &i64| n > 0)?;
    (!file.is_empty() && !inner[..open].is_empty()).then_some((file, line))
}

/// Builds a single-value profile from folded-style stacks.
pub fn from_folded(
    stacks: &[(Vec<String>, i64)],
    sample_type: &str,
    unit: &str,
    period: i64,
) -> Profile {
    let mut b = ProfileBuilder::new(&[(sample_type, unit)]).period(sample_type, unit, period);
    for (frames, value) in stacks {
        b.add(frames, &[*value], &[]);
    }
    b.build()
}

/// One decoded sample, frames root-first, inlined frames expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackSample {
    pub frames: Vec<String>,
    pub values: Vec<i64>,
    /// String labels only; numeric labels have no natural series identity.
    pub labels: Vec<(String, String)>,
}

/// Looks up strings and locations of a profile by index, validating as it goes
/// so hostile profiles yield errors, not panics.
pub struct Resolver<'a> {
    profile: &'a Profile,
    functions: HashMap<u64, &'a Function>,
    mappings: HashMap<u64, &'a Mapping>,
    // Root-first frames of each location, computed once per location id.
    /// Frames of each resolved location, borrowed from the string table
    /// unless a name had to be made (an address) or cut.
    locations: HashMap<u64, Vec<Cow<'a, str>>>,
    raw_locations: HashMap<u64, &'a Location>,
    max_name_len: usize,
}

impl<'a> Resolver<'a> {
    pub fn new(profile: &'a Profile) -> Self {
        Resolver {
            profile,
            functions: profile.function.iter().map(|f| (f.id, f)).collect(),
            mappings: profile.mapping.iter().map(|m| (m.id, m)).collect(),
            raw_locations: profile.location.iter().map(|l| (l.id, l)).collect(),
            locations: HashMap::new(),
            max_name_len: usize::MAX,
        }
    }

    /// Cuts function names to `max` bytes (marked with `…`) once per
    /// location, so a long name repeated in deep stacks costs its cut length.
    pub fn cut_names(mut self, max: usize) -> Self {
        self.max_name_len = max;
        self
    }

    pub fn string(&self, idx: i64) -> Result<&'a str, Error> {
        usize::try_from(idx)
            .ok()
            .and_then(|i| self.profile.string_table.get(i))
            .map(String::as_str)
            .ok_or_else(|| Error::Invalid(format!("string index {idx} out of range")))
    }

    /// (type, unit) of each sample value.
    pub fn sample_types(&self) -> Result<Vec<(&'a str, &'a str)>, Error> {
        self.profile
            .sample_type
            .iter()
            .map(|vt| Ok((self.string(vt.r#type)?, self.string(vt.unit)?)))
            .collect()
    }

    /// Appends the root-first frames of `sample` to `out`.
    pub fn frames(&mut self, sample: &Sample, out: &mut Vec<String>) -> Result<(), Error> {
        let mut frames = Vec::new();
        self.frames_upto(sample, &mut frames, usize::MAX)?;
        out.extend(frames.into_iter().map(Cow::into_owned));
        Ok(())
    }

    /// Appends at most `max` root-first frames of `sample` to `out`: a sample
    /// can repeat one location id millions of times, and only the frames
    /// kept should cost anything.
    /// Names are borrowed from the profile where they can be, so resolving
    /// a stack allocates nothing per frame.
    pub fn frames_upto(&mut self, sample: &Sample, out: &mut Vec<Cow<'a, str>>, max: usize) -> Result<(), Error> {
        let start = out.len();
        for &id in sample.location_id.iter().rev() {
            let room = max - (out.len() - start);
            if room == 0 {
                break;
            }
            if !self.locations.contains_key(&id) {
                let frames = self.resolve_location(id)?;
                self.locations.insert(id, frames);
            }
            out.extend(self.locations[&id].iter().take(room).cloned());
        }
        Ok(())
    }

    pub fn labels(&self, sample: &Sample) -> Result<Vec<(String, String)>, Error> {
        let mut out = Vec::new();
        for l in &sample.label {
            if l.str != 0 {
                out.push((
                    self.string(l.key)?.to_owned(),
                    self.string(l.str)?.to_owned(),
                ));
            }
        }
        Ok(out)
    }

    fn resolve_location(&self, id: u64) -> Result<Vec<Cow<'a, str>>, Error> {
        let loc = self
            .raw_locations
            .get(&id)
            .ok_or_else(|| Error::Invalid(format!("sample references unknown location {id}")))?;
        if loc.line.is_empty() {
            // Unsymbolized: the address is the best name we have.
            let module = self
                .mappings
                .get(&loc.mapping_id)
                .map(|m| self.string(m.filename))
                .transpose()?
                .filter(|s| !s.is_empty());
            return Ok(vec![Cow::Owned(match module {
                Some(m) => format!("{m}+0x{:x}", loc.address),
                None => format!("0x{:x}", loc.address),
            })]);
        }
        // line[0] is the innermost inlined callee; reverse to get root-first.
        loc.line
            .iter()
            .rev()
            .map(|line| {
                let f = self.functions.get(&line.function_id).ok_or_else(|| {
                    Error::Invalid(format!("location {id} references unknown function"))
                })?;
                let name = self.string(f.name)?;
                let name = if name.is_empty() {
                    self.string(f.system_name)?
                } else {
                    name
                };
                Ok(if name.is_empty() {
                    Cow::Borrowed("?")
                } else if name.len() <= self.max_name_len {
                    Cow::Borrowed(name)
                } else {
                    Cow::Owned(cut_name(name, self.max_name_len))
                })
            })
            .collect()
    }
}

/// `name` cut to at most `max` bytes at a character boundary, marked with `…`.
pub fn cut_name(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_owned();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &name[..end])
}

/// Decodes every sample of a profile into root-first stacks.
pub fn to_stacks(profile: &Profile) -> Result<Vec<StackSample>, Error> {
    let mut r = Resolver::new(profile);
    profile
        .sample
        .iter()
        .map(|s| {
            let mut frames = Vec::with_capacity(s.location_id.len());
            r.frames(s, &mut frames)?;
            Ok(StackSample {
                frames,
                values: s.value.clone(),
                labels: r.labels(s)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stacks() -> Vec<(Vec<String>, i64)> {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        vec![
            (s(&["main", "work", "leaf"]), 30),
            (s(&["main", "work"]), 5),
            (s(&["main", "idle"]), 7),
        ]
    }

    #[test]
    fn python_frames_carry_their_file_and_line() {
        let frames = vec!["main".to_string(), "handle (app/server.py:12)".to_string(), "Cls.run (x.py:3)".to_string()];
        let p = from_folded(&[(frames.clone(), 1)], "cpu", "nanoseconds", 1);
        let function = |name: &str| p.function.iter().find(|f| p.string_table[f.name as usize] == name).unwrap();
        let handle = function("handle (app/server.py:12)");
        assert_eq!(p.string_table[handle.filename as usize], "app/server.py");
        let location = p.location.iter().find(|l| l.line[0].function_id == handle.id).unwrap();
        assert_eq!(location.line[0].line, 12);
        assert_eq!(function("main").filename, 0, "a native frame has no source here");
        // Read back whole: the same stacks.
        assert_eq!(to_stacks(&p).unwrap()[0].frames, frames);
        assert_eq!(source_of("operator() (int)"), None);
        assert_eq!(source_of("f (a.py:0)"), None);
        assert_eq!(source_of("f (C:\\x.py:7)"), Some(("C:\\x.py", 7)));
    }

    #[test]
    fn folded_roundtrip_through_gzip() {
        let p = from_folded(&stacks(), "cpu", "nanoseconds", 10_000_000);
        // main, work, leaf, idle: one function/location each.
        assert_eq!(p.function.len(), 4);
        assert_eq!(p.location.len(), 4);
        let bytes = encode_gzip(&p);
        assert_eq!(&bytes[..2], &GZIP_MAGIC);
        let back = decode_gzip(&bytes, 1 << 20).unwrap();
        assert_eq!(back, p);
        let got: Vec<_> = to_stacks(&back)
            .unwrap()
            .into_iter()
            .map(|s| (s.frames, s.values[0]))
            .collect();
        assert_eq!(got, stacks());
        // pprof wants the leaf first.
        let leaf = p.sample[0].location_id[0];
        let leaf_fn = &p.function[(leaf - 1) as usize];
        assert_eq!(p.string_table[leaf_fn.name as usize], "leaf");
    }

    #[test]
    fn accepts_uncompressed() {
        let p = from_folded(&stacks(), "samples", "count", 1);
        assert_eq!(decode_gzip(&p.encode_to_vec(), 1 << 20).unwrap(), p);
    }

    #[test]
    fn rejects_bombs_and_garbage() {
        let zeros = vec![0u8; 1 << 20];
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&zeros).unwrap();
        let bomb = enc.finish().unwrap();
        assert!(matches!(decode_gzip(&bomb, 1000), Err(Error::TooLarge { .. })));

        let good = encode_gzip(&from_folded(&stacks(), "cpu", "nanoseconds", 1));
        assert!(matches!(
            decode_gzip(&good[..good.len() / 2], 1 << 20),
            Err(Error::Gzip(_))
        ));
        assert!(matches!(
            decode_gzip(b"\xff\xff\xff\xff", 1 << 20),
            Err(Error::Protobuf(_))
        ));
    }

    #[test]
    fn dangling_references_are_errors() {
        let mut p = from_folded(&stacks(), "cpu", "nanoseconds", 1);
        p.sample[0].location_id.push(999);
        assert!(matches!(to_stacks(&p), Err(Error::Invalid(_))));
        p.sample[0].location_id.pop();
        p.function[0].name = 1000;
        assert!(matches!(to_stacks(&p), Err(Error::Invalid(_))));
    }

    #[test]
    fn inlined_lines_expand_root_first() {
        let mut p = from_folded(&stacks(), "cpu", "nanoseconds", 1);
        // The leaf's location now also carries "idle" as the caller it was
        // inlined into: line[0] is the callee.
        let leaf = p.sample[0].location_id[0];
        let idle = p.sample[2].location_id[0];
        let loc = p.location.iter_mut().find(|l| l.id == leaf).unwrap();
        loc.line.push(Line {
            function_id: idle,
            ..Line::default()
        });
        let s = to_stacks(&p).unwrap();
        assert_eq!(s[0].frames, ["main", "work", "idle", "leaf"]);
    }
}
