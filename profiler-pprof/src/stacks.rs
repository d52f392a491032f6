//! Our agent's own ingest format: one window of one (service, labels, kind)
//! as a list of stacks with their values.
//!
//! A pprof carries every frame name of every window again, and the server
//! pays for those bytes in gunzip, decoding and hashing although it knew
//! almost every stack already. Here a stack the server has acknowledged goes
//! by its id alone ([`stack_id`] of its frames, which the server computes the
//! same way), eight bytes instead of about two kilobytes of names. A server
//! that does not know an id refuses the request (409), and the agent sends
//! the window again with every stack's frames.
//!
//! Layout: [`MAGIC`], the entries, and an end mark. A framed entry is byte
//! 1, the zigzag varint value, the varint frame count and each frame as a
//! varint length and UTF-8 bytes, root first. A known entry is byte 2, the id
//! as 8 bytes little-endian and the zigzag varint value. The end mark is byte
//! 0 and the varint count of entries, so a body cut between two entries is
//! refused, not read short. Reading borrows the frame names from the buffer
//! and allocates nothing.
//!
//! An agent's window holds one such list per (service, labels, kind), a
//! dozen or more. Sent one request each, every request pays its own HTTP
//! exchange and its own WAL fsync for a few dozen rows; a [bundle](Bundle)
//! carries them all in one request. Layout: [`BUNDLE_MAGIC`], the parts, and
//! an end mark. A part is byte 1, then as varint length and UTF-8 bytes the
//! service, the kind, the varint count of labels and each label's name and
//! value, then the part's stacks window (with its own magic) as varint
//! length and bytes. The end mark is byte 0 and the varint count of parts.
//!
//! A part with wait histograms (bundle format `bundle2`, see [`crate::waits`])
//! is byte 2 instead of 1, and after its window carries, as varint length and
//! bytes, its waits section: the varint count of histograms, then for each the
//! varint gap from the previous histogram's entry index (the first: the index
//! plus one), the varint count of buckets and each bucket as the varint gap
//! from the previous bucket (the first: the bucket plus one) and the varint
//! weighted count. Servers that read only `bundle` refuse byte 2, so the agent
//! sends `bundle2` only to servers that take it.
//!
//! A part whose time is also attributed to requests (bundle format `bundle3`)
//! is byte 3: after its window come, each as varint length and bytes, its
//! waits section (possibly empty) and its requests section: the varint count
//! of requests, then for each its key and value (as varint length and UTF-8
//! bytes), the varint count of its entries and each entry as the varint gap
//! from the previous entry index (the first: the index plus one) and the
//! varint value the request holds of that entry. A request's values are part
//! of the entries' values, not added to them: the window stays the part's
//! whole profile, and a server that ignores requests reads it right.

use crate::Error;

pub const MAGIC: &[u8; 4] = b"PST1";
pub const BUNDLE_MAGIC: &[u8; 4] = b"PSB1";
const END: u8 = 0;
const FRAMED: u8 = 1;
const KNOWN: u8 = 2;
const PART: u8 = 1;
const PART_WITH_WAITS: u8 = 2;
const PART_WITH_REQUESTS: u8 = 3;

/// Content hash of a root-first stack; frames are separated by a byte that
/// cannot occur in UTF-8, so `["a;b"]` and `["a", "b"]` differ.
pub fn stack_id<S: AsRef<str>>(frames: &[S]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for f in frames {
        h.update(f.as_ref().as_bytes());
        h.update(&[0xff]);
    }
    h.digest()
}

/// Builds a window's body (uncompressed).
pub struct Writer {
    buf: Vec<u8>,
    entries: u64,
}

impl Default for Writer {
    fn default() -> Self {
        Writer { buf: MAGIC.to_vec(), entries: 0 }
    }
}

impl Writer {
    pub fn framed<S: AsRef<str>>(&mut self, frames: &[S], value: i64) {
        self.entries += 1;
        self.buf.push(FRAMED);
        varint(&mut self.buf, zigzag(value));
        varint(&mut self.buf, frames.len() as u64);
        for f in frames {
            bytes(&mut self.buf, f.as_ref().as_bytes());
        }
    }

    pub fn known(&mut self, id: u64, value: i64) {
        self.entries += 1;
        self.buf.push(KNOWN);
        self.buf.extend_from_slice(&id.to_le_bytes());
        varint(&mut self.buf, zigzag(value));
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.buf.push(END);
        varint(&mut self.buf, self.entries);
        self.buf
    }
}

/// One entry of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry<'a> {
    Framed { frames: Frames<'a>, value: i64 },
    Known { id: u64, value: i64 },
}

/// The frame names of a framed entry, root first, read on iteration (their
/// UTF-8 is checked then).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frames<'a> {
    count: u64,
    bytes: &'a [u8],
}

impl<'a> Frames<'a> {
    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends the names to `out` (cleared first).
    pub fn read_into(&self, out: &mut Vec<&'a str>) -> Result<(), Error> {
        out.clear();
        let mut rest = self.bytes;
        for _ in 0..self.count {
            let len = read_varint(&mut rest).map_err(invalid)? as usize;
            let name = take(&mut rest, len).map_err(invalid)?;
            out.push(std::str::from_utf8(name).map_err(|_| invalid("a frame name is not UTF-8"))?);
        }
        Ok(())
    }
}

/// Reads the entries of a body; a malformed body ends in one error.
pub struct Reader<'a> {
    rest: &'a [u8],
    entries: u64,
}

impl<'a> Reader<'a> {
    pub fn new(body: &'a [u8]) -> Result<Self, Error> {
        let rest = body.strip_prefix(MAGIC.as_slice()).ok_or_else(|| invalid("not a stacks window (bad magic)"))?;
        Ok(Reader { rest, entries: 0 })
    }

    /// The next entry, None after the end mark.
    fn entry(&mut self) -> Result<Option<Entry<'a>>, Error> {
        let (&tag, rest) = self.rest.split_first().ok_or_else(|| invalid("cut short (no end mark)"))?;
        self.rest = rest;
        self.entries += 1;
        let entry = match tag {
            END => {
                let written = read_varint(&mut self.rest).map_err(invalid)?;
                if written != self.entries - 1 || !self.rest.is_empty() {
                    return Err(invalid("the end mark does not match the entries"));
                }
                return Ok(None);
            }
            FRAMED => {
                let value = unzigzag(read_varint(&mut self.rest).map_err(invalid)?);
                let count = read_varint(&mut self.rest).map_err(invalid)?;
                // Skip the names now, so the entry knows its extent.
                let start = self.rest;
                for _ in 0..count {
                    let len = read_varint(&mut self.rest).map_err(invalid)? as usize;
                    take(&mut self.rest, len).map_err(invalid)?;
                }
                let bytes = &start[..start.len() - self.rest.len()];
                Entry::Framed { frames: Frames { count, bytes }, value }
            }
            KNOWN => {
                let id = u64::from_le_bytes(take(&mut self.rest, 8).map_err(invalid)?.try_into().expect("8 bytes"));
                let value = unzigzag(read_varint(&mut self.rest).map_err(invalid)?);
                Entry::Known { id, value }
            }
            other => return Err(invalid(&format!("unknown entry type {other}"))),
        };
        Ok(Some(entry))
    }
}

impl<'a> Iterator for Reader<'a> {
    type Item = Result<Entry<'a>, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.entries == u64::MAX {
            return None;
        }
        let entry = self.entry().transpose();
        if !matches!(entry, Some(Ok(_))) {
            // Ended, or malformed: nothing more is read.
            self.entries = u64::MAX;
        }
        entry
    }
}

/// Builds a bundle (uncompressed): the stacks windows of one agent window.
pub struct BundleWriter {
    buf: Vec<u8>,
    parts: u64,
}

impl Default for BundleWriter {
    fn default() -> Self {
        BundleWriter { buf: BUNDLE_MAGIC.to_vec(), parts: 0 }
    }
}

impl BundleWriter {
    /// Adds the stacks window `window` (a [`Writer`]'s output) of one
    /// (service, labels, kind).
    pub fn part<K: AsRef<str>, V: AsRef<str>>(&mut self, service: &str, kind: &str, labels: &[(K, V)], window: &[u8]) {
        self.part_with_waits(service, kind, labels, window, &[]);
    }

    /// Like [`Self::part`], with a waits section ([`WaitsWriter`]'s output);
    /// an empty one writes a plain part.
    pub fn part_with_waits<K: AsRef<str>, V: AsRef<str>>(
        &mut self,
        service: &str,
        kind: &str,
        labels: &[(K, V)],
        window: &[u8],
        waits: &[u8],
    ) {
        self.part_with_requests(service, kind, labels, window, waits, &[]);
    }

    /// Like [`Self::part_with_waits`], with a requests section
    /// ([`RequestsWriter`]'s output); an empty one writes a part without.
    pub fn part_with_requests<K: AsRef<str>, V: AsRef<str>>(
        &mut self,
        service: &str,
        kind: &str,
        labels: &[(K, V)],
        window: &[u8],
        waits: &[u8],
        requests: &[u8],
    ) {
        self.parts += 1;
        self.buf.push(match (waits.is_empty(), requests.is_empty()) {
            (_, false) => PART_WITH_REQUESTS,
            (false, true) => PART_WITH_WAITS,
            (true, true) => PART,
        });
        bytes(&mut self.buf, service.as_bytes());
        bytes(&mut self.buf, kind.as_bytes());
        varint(&mut self.buf, labels.len() as u64);
        for (name, value) in labels {
            bytes(&mut self.buf, name.as_ref().as_bytes());
            bytes(&mut self.buf, value.as_ref().as_bytes());
        }
        bytes(&mut self.buf, window);
        if !waits.is_empty() || !requests.is_empty() {
            bytes(&mut self.buf, waits);
        }
        if !requests.is_empty() {
            bytes(&mut self.buf, requests);
        }
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.buf.push(END);
        varint(&mut self.buf, self.parts);
        self.buf
    }
}

/// Builds a part's waits section: histograms of its entries, by entry index.
#[derive(Default)]
pub struct WaitsWriter {
    buf: Vec<u8>,
    count: u64,
    next_entry: u64,
}

impl WaitsWriter {
    /// The histogram of entry `index` (of the part's window, from 0); indexes
    /// must ascend. Empty histograms are not written.
    pub fn histogram(&mut self, index: u64, histogram: &crate::waits::Histogram) {
        if histogram.is_empty() {
            return;
        }
        assert!(index >= self.next_entry, "wait histograms must be written in entry order");
        self.count += 1;
        varint(&mut self.buf, index - self.next_entry + 1);
        self.next_entry = index + 1;
        let buckets: Vec<_> = histogram.buckets().collect();
        varint(&mut self.buf, buckets.len() as u64);
        let mut next = 0u64;
        for (bucket, count) in buckets {
            varint(&mut self.buf, bucket as u64 - next + 1);
            next = bucket as u64 + 1;
            varint(&mut self.buf, count);
        }
    }

    /// The section; empty when no histogram was written.
    pub fn finish(self) -> Vec<u8> {
        counted(self.count, &self.buf)
    }
}

/// Reads a waits section: (entry index, histogram), entry indexes ascending
/// and below `entries` (the part's window's entry count).
pub fn read_waits(section: &[u8], entries: u64) -> Result<Vec<(u64, crate::waits::Histogram)>, Error> {
    let bad = |what: &str| Error::Invalid(format!("waits section: {what}"));
    let mut rest = section;
    let count = read_varint(&mut rest).map_err(|e| bad(e))?;
    // Each histogram takes at least three bytes.
    if count > rest.len() as u64 / 3 {
        return Err(bad("more histograms than bytes"));
    }
    let mut out = Vec::with_capacity(count as usize);
    let mut next_entry = 0u64;
    for _ in 0..count {
        let index = next_index(&mut rest, &mut next_entry, entries).map_err(|e| bad(e))?;
        let buckets = read_varint(&mut rest).map_err(|e| bad(e))?;
        if buckets == 0 || buckets > crate::waits::BUCKETS as u64 {
            return Err(bad("a histogram without buckets or with too many"));
        }
        let mut histogram = crate::waits::Histogram::default();
        let mut next = 0u64;
        for _ in 0..buckets {
            let gap = read_varint(&mut rest).map_err(|e| bad(e))?;
            let bucket = (next + gap).checked_sub(1).filter(|_| gap > 0);
            let bucket = bucket.filter(|&b| b < crate::waits::BUCKETS as u64).ok_or_else(|| bad("a bucket out of order or range"))?;
            next = bucket + 1;
            let weight = read_varint(&mut rest).map_err(|e| bad(e))?;
            if weight == 0 {
                return Err(bad("an empty bucket"));
            }
            histogram.add(bucket as u16, weight);
        }
        out.push((index, histogram));
    }
    if !rest.is_empty() {
        return Err(bad("bytes after the last histogram"));
    }
    Ok(out)
}

/// Builds a part's requests section: per request, its share of entries' values.
#[derive(Default)]
pub struct RequestsWriter {
    buf: Vec<u8>,
    count: u64,
}

impl RequestsWriter {
    /// Request `key`=`value`'s values of entries `(index, value)`, indexes
    /// ascending. A request without entries is not written.
    pub fn request(&mut self, key: &str, value: &str, entries: &[(u64, u64)]) {
        if entries.is_empty() {
            return;
        }
        self.count += 1;
        bytes(&mut self.buf, key.as_bytes());
        bytes(&mut self.buf, value.as_bytes());
        varint(&mut self.buf, entries.len() as u64);
        let mut next = 0u64;
        for &(index, v) in entries {
            assert!(index >= next, "a request's entries must be written in entry order");
            varint(&mut self.buf, index - next + 1);
            next = index + 1;
            varint(&mut self.buf, v);
        }
    }

    /// The section; empty when no request was written.
    pub fn finish(self) -> Vec<u8> {
        counted(self.count, &self.buf)
    }
}

/// One request of a requests section: its key and value and its values of
/// the part's entries, by entry index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestEntries<'a> {
    pub key: &'a str,
    pub value: &'a str,
    pub entries: Vec<(u64, u64)>,
}

/// Reads a requests section; entry indexes ascend within a request and are
/// below `entries` (the part's window's entry count).
pub fn read_requests(section: &[u8], entries: u64) -> Result<Vec<RequestEntries<'_>>, Error> {
    let bad = |what: &str| Error::Invalid(format!("requests section: {what}"));
    let mut rest = section;
    let count = read_varint(&mut rest).map_err(|e| bad(e))?;
    // Each request takes at least five bytes.
    if count > rest.len() as u64 / 5 {
        return Err(bad("more requests than bytes"));
    }
    let mut out = Vec::with_capacity(count as usize);
    fn text<'a>(rest: &mut &'a [u8]) -> Result<&'a str, Error> {
        let bad = |what: &str| Error::Invalid(format!("requests section: {what}"));
        let len = read_varint(rest).map_err(|e| bad(e))? as usize;
        std::str::from_utf8(take(rest, len).map_err(|e| bad(e))?).map_err(|_| bad("a key or value is not UTF-8"))
    }
    for _ in 0..count {
        let key = text(&mut rest)?;
        let value = text(&mut rest)?;
        let n = read_varint(&mut rest).map_err(|e| bad(e))?;
        if n == 0 || n > rest.len() as u64 / 2 {
            return Err(bad("a request without entries or with more than bytes"));
        }
        let mut list = Vec::with_capacity(n as usize);
        let mut next = 0u64;
        for _ in 0..n {
            let index = next_index(&mut rest, &mut next, entries).map_err(|e| bad(e))?;
            list.push((index, read_varint(&mut rest).map_err(|e| bad(e))?));
        }
        out.push(RequestEntries { key, value, entries: list });
    }
    if !rest.is_empty() {
        return Err(bad("bytes after the last request"));
    }
    Ok(out)
}

/// One (service, labels, kind) of a bundle; `window` is read with [`Reader`],
/// `waits` (empty for a plain part) with [`read_waits`], `requests` (empty
/// for a part without) with [`read_requests`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part<'a> {
    pub service: &'a str,
    pub kind: &'a str,
    pub labels: Vec<(&'a str, &'a str)>,
    pub window: &'a [u8],
    pub waits: &'a [u8],
    pub requests: &'a [u8],
}

/// Reads the parts of a bundle; a malformed bundle ends in one error.
pub struct BundleReader<'a> {
    rest: &'a [u8],
    parts: u64,
}

impl<'a> BundleReader<'a> {
    pub fn new(body: &'a [u8]) -> Result<Self, Error> {
        let rest = body
            .strip_prefix(BUNDLE_MAGIC.as_slice())
            .ok_or_else(|| invalid_bundle("bad magic"))?;
        Ok(BundleReader { rest, parts: 0 })
    }

    fn part(&mut self) -> Result<Option<Part<'a>>, Error> {
        let (&tag, rest) = self.rest.split_first().ok_or_else(|| invalid_bundle("cut short (no end mark)"))?;
        self.rest = rest;
        match tag {
            END => {
                let written = read_varint(&mut self.rest).map_err(invalid_bundle)?;
                if written != self.parts || !self.rest.is_empty() {
                    return Err(invalid_bundle("the end mark does not match the parts"));
                }
                Ok(None)
            }
            PART | PART_WITH_WAITS | PART_WITH_REQUESTS => {
                self.parts += 1;
                let service = self.text()?;
                let kind = self.text()?;
                let count = read_varint(&mut self.rest).map_err(invalid_bundle)?;
                // Each label takes at least two bytes: a count beyond the
                // bytes left cannot make the reader allocate.
                if count > self.rest.len() as u64 / 2 {
                    return Err(invalid_bundle("more labels than bytes"));
                }
                let mut labels = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    labels.push((self.text()?, self.text()?));
                }
                let len = read_varint(&mut self.rest).map_err(invalid_bundle)? as usize;
                let window = take(&mut self.rest, len).map_err(invalid_bundle)?;
                let mut section = |present: bool| -> Result<&'a [u8], Error> {
                    if !present {
                        return Ok(&[]);
                    }
                    let len = read_varint(&mut self.rest).map_err(invalid_bundle)? as usize;
                    take(&mut self.rest, len).map_err(invalid_bundle)
                };
                let waits = section(tag != PART)?;
                let requests = section(tag == PART_WITH_REQUESTS)?;
                Ok(Some(Part { service, kind, labels, window, waits, requests }))
            }
            other => Err(invalid_bundle(&format!("unknown entry type {other}"))),
        }
    }

    fn text(&mut self) -> Result<&'a str, Error> {
        let len = read_varint(&mut self.rest).map_err(invalid_bundle)? as usize;
        std::str::from_utf8(take(&mut self.rest, len).map_err(invalid_bundle)?).map_err(|_| invalid_bundle("a name or label is not UTF-8"))
    }
}

impl<'a> Iterator for BundleReader<'a> {
    type Item = Result<Part<'a>, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.parts == u64::MAX {
            return None;
        }
        let part = self.part().transpose();
        if !matches!(part, Some(Ok(_))) {
            self.parts = u64::MAX;
        }
        part
    }
}

fn invalid(what: &str) -> Error {
    Error::Invalid(format!("stacks window: {what}"))
}

fn invalid_bundle(what: &str) -> Error {
    Error::Invalid(format!("bundle of stacks windows: {what}"))
}

/// A section: the varint count of its items, then their bytes; nothing without items.
fn counted(count: u64, items: &[u8]) -> Vec<u8> {
    if count == 0 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(items.len() + 4);
    varint(&mut out, count);
    out.extend_from_slice(items);
    out
}

/// Reads an entry index written as the gap from `next` (the previous index plus one;
/// the first: the index plus one), which must ascend and stay below `entries`.
fn next_index(rest: &mut &[u8], next: &mut u64, entries: u64) -> Result<u64, &'static str> {
    let gap = read_varint(rest)?;
    let index = next.checked_add(gap).and_then(|i| i.checked_sub(1)).filter(|_| gap > 0);
    let index = index.filter(|&i| i < entries).ok_or("an entry index out of order or range")?;
    *next = index + 1;
    Ok(index)
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    (v >> 1) as i64 ^ -((v & 1) as i64)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes(out: &mut Vec<u8>, b: &[u8]) {
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn read_varint(rest: &mut &[u8]) -> Result<u64, &'static str> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, tail) = rest.split_first().ok_or("cut short")?;
        *rest = tail;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Ok(v);
        }
    }
    Err("a number longer than 64 bits")
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], &'static str> {
    if rest.len() < n {
        return Err("cut short");
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let mut w = Writer::default();
        w.framed(&["main", "ünïcode", ""], 1_000_000_007);
        w.known(u64::MAX - 5, -3);
        w.framed::<&str>(&[], 0);
        let body = w.finish();
        let entries: Vec<Entry> = Reader::new(&body).unwrap().collect::<Result<_, _>>().unwrap();
        assert_eq!(entries.len(), 3);
        let mut names = Vec::new();
        let Entry::Framed { frames, value } = entries[0] else { panic!("{entries:?}") };
        frames.read_into(&mut names).unwrap();
        assert_eq!((names.as_slice(), value), (["main", "ünïcode", ""].as_slice(), 1_000_000_007));
        assert_eq!(entries[1], Entry::Known { id: u64::MAX - 5, value: -3 });
        let Entry::Framed { frames, .. } = entries[2] else { panic!("{entries:?}") };
        assert!(frames.is_empty());
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        let mut w = Writer::default();
        w.framed(&["main", "leaf"], 5);
        w.known(7, 9);
        let body = w.finish();
        assert!(Reader::new(b"PST").is_err());
        for cut in MAGIC.len()..body.len() {
            let results: Vec<_> = Reader::new(&body[..cut]).unwrap().collect();
            assert!(results.last().unwrap().is_err(), "cut at {cut}");
        }
        let mut bad = body.clone();
        bad[MAGIC.len()] = 9;
        assert!(Reader::new(&bad).unwrap().next().unwrap().is_err());
        // A frame count far beyond the bytes cannot make the reader allocate.
        let huge = [MAGIC.as_slice(), &[FRAMED, 2, 0xff, 0xff, 0xff, 0xff, 0x0f, END, 1]].concat();
        assert!(Reader::new(&huge).unwrap().next().unwrap().is_err());
        let mut invalid_utf8 = Writer::default();
        invalid_utf8.framed(&["\u{fffd}"], 1);
        let mut body = invalid_utf8.finish();
        let at = body.len() - 5;
        body[at] = 0xff;
        let Entry::Framed { frames, .. } = Reader::new(&body).unwrap().next().unwrap().unwrap() else { panic!() };
        assert!(frames.read_into(&mut Vec::new()).is_err());
    }

    #[test]
    fn bundles_round_trip_and_refuse_cut_or_forged_bodies() {
        let mut w = Writer::default();
        w.framed(&["main", "leaf"], 5);
        let window = w.finish();
        let mut b = BundleWriter::default();
        b.part("api", "on-cpu", &[("host", "h1"), ("pid", "7")], &window);
        let mut waits = WaitsWriter::default();
        let mut h = crate::waits::Histogram::default();
        h.record(2_000_000, crate::waits::ONE);
        waits.histogram(0, &h);
        let waits = waits.finish();
        b.part_with_waits::<&str, &str>("db", "off-cpu:io", &[], &window, &waits);
        let body = b.finish();
        let parts: Vec<Part> = BundleReader::new(&body).unwrap().collect::<Result<_, _>>().unwrap();
        assert_eq!(
            parts,
            [
                Part { service: "api", kind: "on-cpu", labels: vec![("host", "h1"), ("pid", "7")], window: &window, waits: &[], requests: &[] },
                Part { service: "db", kind: "off-cpu:io", labels: vec![], window: &window, waits: &waits, requests: &[] },
            ]
        );
        assert!(BundleReader::new(&window).is_err(), "a single window is not a bundle");
        for cut in BUNDLE_MAGIC.len()..body.len() {
            let results: Vec<_> = BundleReader::new(&body[..cut]).unwrap().collect();
            assert!(results.last().unwrap().is_err(), "cut at {cut}");
        }
        // A label count far beyond the bytes cannot make the reader allocate.
        let huge = [BUNDLE_MAGIC.as_slice(), &[PART, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f]].concat();
        assert!(BundleReader::new(&huge).unwrap().next().unwrap().is_err());
    }

    #[test]
    fn waits_sections_round_trip_and_refuse_forged_ones() {
        use crate::waits::{Histogram, ONE};
        let (mut a, mut b) = (Histogram::default(), Histogram::default());
        a.record(2_000_000, ONE);
        a.record(2_100_000, ONE);
        a.record(60_000_000, 3 * ONE);
        b.record(5_000, 7);
        let mut w = WaitsWriter::default();
        w.histogram(1, &a);
        w.histogram(2, &Histogram::default());
        w.histogram(4, &b);
        let section = w.finish();
        assert_eq!(read_waits(&section, 5).unwrap(), [(1, a), (4, b)]);
        assert!(read_waits(&section, 4).is_err(), "an entry index past the window");
        for cut in 0..section.len() {
            assert!(read_waits(&section[..cut], 5).is_err(), "cut at {cut}");
        }
        assert!(read_waits(&[section.as_slice(), &[0]].concat(), 5).is_err());
        // A bucket past the last, an empty bucket, a count far beyond the bytes.
        assert!(read_waits(&[1, 1, 1, 0x81, 0x08, 1], 1).is_err());
        assert!(read_waits(&[1, 1, 1, 1, 0], 1).is_err());
        assert!(read_waits(&[0xff, 0xff, 0xff, 0x0f, 1, 1, 1, 1], 1).is_err());
        assert!(WaitsWriter::default().finish().is_empty());
    }

    #[test]
    fn requests_sections_round_trip_and_refuse_forged_ones() {
        let mut w = RequestsWriter::default();
        w.request("request_id", "r-1", &[(0, 40_000_000), (2, 7)]);
        w.request("request_id", "r-2", &[]);
        w.request("span_id", "s", &[(1, 3)]);
        let section = w.finish();
        let read = read_requests(&section, 3).unwrap();
        assert_eq!(
            read,
            [
                RequestEntries { key: "request_id", value: "r-1", entries: vec![(0, 40_000_000), (2, 7)] },
                RequestEntries { key: "span_id", value: "s", entries: vec![(1, 3)] },
            ]
        );
        assert!(read_requests(&section, 2).is_err(), "an entry index past the window");
        for cut in 0..section.len() {
            assert!(read_requests(&section[..cut], 3).is_err(), "cut at {cut}");
        }
        assert!(read_requests(&[section.as_slice(), &[0]].concat(), 3).is_err());
        // A count far beyond the bytes; a request without entries.
        assert!(read_requests(&[0xff, 0xff, 0xff, 0x0f, 1, b'k', 1, b'v', 0], 1).is_err());
        assert!(read_requests(&[1, 1, b'k', 1, b'v', 0, 0], 1).is_err());
        assert!(RequestsWriter::default().finish().is_empty());

        // In a bundle, with or without waits before it.
        let mut win = Writer::default();
        win.framed(&["main"], 9);
        let window = win.finish();
        let mut b = BundleWriter::default();
        b.part_with_requests::<&str, &str>("api", "on-cpu", &[], &window, &[], &section);
        let body = b.finish();
        let parts: Vec<Part> = BundleReader::new(&body).unwrap().collect::<Result<_, _>>().unwrap();
        assert_eq!((parts[0].waits, parts[0].requests), (&[][..], &section[..]));
        for cut in BUNDLE_MAGIC.len()..body.len() {
            assert!(BundleReader::new(&body[..cut]).unwrap().last().unwrap().is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn ids_respect_frame_boundaries() {
        assert_ne!(stack_id(&["a;b"]), stack_id(&["a", "b"]));
        assert_ne!(stack_id(&["a", "b"]), stack_id(&["b", "a"]));
        // Stores key their data by these ids: the hash must never change.
        assert_eq!(stack_id(&["main", "leaf"]), 7_265_922_926_808_922_308);
    }
}
