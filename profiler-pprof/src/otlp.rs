//! OTLP profiles → pprof: each OTLP profile becomes a pprof profile, so the
//! server ingests it by the same rules as any pprof (sample types, units,
//! labels, depth and name limits).
//!
//! Accepted: the profiles signal `v1development` as of opentelemetry-proto
//! v1.10.0 (one `ProfilesDictionary` per request with shared string, function,
//! location, stack, link and attribute tables). Earlier development layouts
//! kept those tables per profile; a request in such a layout has samples but
//! no dictionary and is refused with that reason.
//!
//! Resource attributes become labels of every profile of the resource;
//! profile and sample attributes become pprof sample labels; a sample's link
//! to a trace becomes the `trace_id` and `span_id` labels (lower-case hex), so
//! a flame graph can be filtered to one trace or span.

use std::collections::HashMap;

pub use opentelemetry_proto::tonic::collector::profiles::v1development::{
    ExportProfilesServiceRequest, ExportProfilesServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue};
use opentelemetry_proto::tonic::profiles::v1development::{self as otlp, ProfilesDictionary};

use crate::{Error, Function, Label, Line, Location, Mapping, Profile, Sample, ValueType};

/// The opentelemetry-proto release whose profiles layout is accepted.
pub const ACCEPTED_VERSION: &str = "opentelemetry-proto v1.10.0 (profiles v1development)";

/// One OTLP profile as pprof, with its resource's attributes and its id.
pub struct ResourceProfile {
    pub resource: Vec<(String, String)>,
    pub profile: Profile,
    /// The OTLP `profile_id` in hex, if set.
    pub profile_id: Option<String>,
}

pub fn to_pprof(request: &ExportProfilesServiceRequest) -> Result<Vec<ResourceProfile>, Error> {
    let samples: usize = request
        .resource_profiles
        .iter()
        .flat_map(|r| &r.scope_profiles)
        .flat_map(|s| &s.profiles)
        .map(|p| p.samples.len())
        .sum();
    let dict = match &request.dictionary {
        Some(d) if !d.string_table.is_empty() => d,
        _ if samples == 0 => return Ok(Vec::new()),
        _ => {
            return Err(Error::Invalid(format!(
                "profiles without a shared dictionary: an earlier development layout of OTLP profiles; this server accepts {ACCEPTED_VERSION}"
            )))
        }
    };
    let base = Tables::new(dict)?;
    let mut out = Vec::new();
    for rp in &request.resource_profiles {
        let resource: Vec<(String, String)> = rp
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .filter_map(|kv| {
                Some((
                    kv.key.clone(),
                    any_value(kv.value.as_ref()?, &dict.string_table)?,
                ))
            })
            .collect();
        for p in rp.scope_profiles.iter().flat_map(|s| &s.profiles) {
            out.push(ResourceProfile {
                resource: resource.clone(),
                profile: base.profile(dict, p)?,
                profile_id: (!p.profile_id.is_empty()).then(|| hex(&p.profile_id)),
            });
        }
    }
    Ok(out)
}

/// The dictionary's tables in pprof form, shared by every profile: pprof ids
/// are OTLP indices + 1 (pprof reserves id 0 for "none").
struct Tables {
    functions: Vec<Function>,
    mappings: Vec<Mapping>,
    locations: Vec<Location>,
}

fn id(index: i32) -> u64 {
    index as u64 + 1
}

impl Tables {
    fn new(dict: &ProfilesDictionary) -> Result<Tables, Error> {
        let strings = dict.string_table.len() as i32;
        let string = |i: i32| -> Result<i64, Error> {
            if (0..strings).contains(&i) {
                Ok(i64::from(i))
            } else {
                Err(Error::Invalid(format!("string index {i} out of range")))
            }
        };
        let functions = dict
            .function_table
            .iter()
            .enumerate()
            .map(|(i, f)| {
                Ok(Function {
                    id: i as u64 + 1,
                    name: string(f.name_strindex)?,
                    system_name: string(f.system_name_strindex)?,
                    filename: string(f.filename_strindex)?,
                    start_line: f.start_line,
                })
            })
            .collect::<Result<_, Error>>()?;
        let mappings = dict
            .mapping_table
            .iter()
            .enumerate()
            .map(|(i, m)| {
                Ok(Mapping {
                    id: i as u64 + 1,
                    memory_start: m.memory_start,
                    memory_limit: m.memory_limit,
                    file_offset: m.file_offset,
                    filename: string(m.filename_strindex)?,
                    ..Mapping::default()
                })
            })
            .collect::<Result<_, Error>>()?;
        let in_range = |what: &str, i: i32, len: usize| -> Result<(), Error> {
            if (0..len as i32).contains(&i) {
                Ok(())
            } else {
                Err(Error::Invalid(format!("{what} index {i} out of range")))
            }
        };
        let locations = dict
            .location_table
            .iter()
            .enumerate()
            .map(|(i, l)| {
                in_range("mapping", l.mapping_index, dict.mapping_table.len().max(1))?;
                let line = l
                    .lines
                    .iter()
                    .map(|line| {
                        in_range("function", line.function_index, dict.function_table.len())?;
                        Ok(Line {
                            function_id: id(line.function_index),
                            line: line.line,
                            column: line.column,
                        })
                    })
                    .collect::<Result<_, Error>>()?;
                Ok(Location {
                    id: i as u64 + 1,
                    // Index 0 is the dictionary's null mapping.
                    mapping_id: if l.mapping_index > 0 {
                        id(l.mapping_index)
                    } else {
                        0
                    },
                    address: l.address,
                    line,
                    is_folded: false,
                })
            })
            .collect::<Result<_, Error>>()?;
        Ok(Tables {
            functions,
            mappings,
            locations,
        })
    }

    fn profile(&self, dict: &ProfilesDictionary, p: &otlp::Profile) -> Result<Profile, Error> {
        let mut strings = Strings::new(&dict.string_table);
        let value_type = |v: &Option<otlp::ValueType>| {
            v.as_ref().map(|v| ValueType {
                r#type: i64::from(v.type_strindex),
                unit: i64::from(v.unit_strindex),
            })
        };
        let sample_type = value_type(&p.sample_type)
            .ok_or_else(|| Error::Invalid("profile has no sample type".into()))?;
        let common = attributes(dict, &p.attribute_indices, &mut strings)?;
        let mut samples = Vec::with_capacity(p.samples.len());
        for s in &p.samples {
            let stack = usize::try_from(s.stack_index)
                .ok()
                .and_then(|i| dict.stack_table.get(i))
                .ok_or_else(|| {
                    Error::Invalid(format!("stack index {} out of range", s.stack_index))
                })?;
            let location_id = stack
                .location_indices
                .iter()
                .map(|&i| {
                    if (0..dict.location_table.len() as i32).contains(&i) {
                        Ok(id(i))
                    } else {
                        Err(Error::Invalid(format!("location index {i} out of range")))
                    }
                })
                .collect::<Result<_, Error>>()?;
            // Events without values count one each.
            let value = if s.values.is_empty() {
                s.timestamps_unix_nano.len() as i64
            } else {
                s.values.iter().fold(0i64, |a, v| a.saturating_add(*v))
            };
            let mut label = common.clone();
            label.extend(attributes(dict, &s.attribute_indices, &mut strings)?);
            if s.link_index > 0 {
                let link = usize::try_from(s.link_index)
                    .ok()
                    .and_then(|i| dict.link_table.get(i))
                    .ok_or_else(|| {
                        Error::Invalid(format!("link index {} out of range", s.link_index))
                    })?;
                for (key, bytes) in [("trace_id", &link.trace_id), ("span_id", &link.span_id)] {
                    if !bytes.is_empty() {
                        label.push(strings.label(key, &hex(bytes)));
                    }
                }
            }
            samples.push(Sample {
                location_id,
                value: vec![value],
                label,
            });
        }
        Ok(Profile {
            sample_type: vec![sample_type],
            sample: samples,
            mapping: self.mappings.clone(),
            location: self.locations.clone(),
            function: self.functions.clone(),
            time_nanos: p.time_unix_nano as i64,
            duration_nanos: p.duration_nano as i64,
            period_type: value_type(&p.period_type),
            period: p.period,
            string_table: strings.into_table(),
            ..Profile::default()
        })
    }
}

/// The dictionary's strings plus those labels add (attribute keys and
/// values that are not strings of the table, hex trace ids).
struct Strings<'a> {
    table: &'a [String],
    added: Vec<String>,
    index: HashMap<String, i64>,
}

impl<'a> Strings<'a> {
    fn new(table: &'a [String]) -> Self {
        Strings {
            table,
            added: Vec::new(),
            index: HashMap::new(),
        }
    }

    fn intern(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = (self.table.len() + self.added.len()) as i64;
        self.added.push(s.to_owned());
        self.index.insert(s.to_owned(), i);
        i
    }

    fn label(&mut self, key: &str, value: &str) -> Label {
        Label {
            key: self.intern(key),
            str: self.intern(value),
            ..Label::default()
        }
    }

    fn into_table(self) -> Vec<String> {
        self.table.iter().cloned().chain(self.added).collect()
    }
}

fn attributes(
    dict: &ProfilesDictionary,
    indices: &[i32],
    strings: &mut Strings,
) -> Result<Vec<Label>, Error> {
    let mut out = Vec::with_capacity(indices.len());
    for &i in indices {
        let kv = usize::try_from(i)
            .ok()
            .and_then(|i| dict.attribute_table.get(i))
            .ok_or_else(|| Error::Invalid(format!("attribute index {i} out of range")))?;
        let key = usize::try_from(kv.key_strindex)
            .ok()
            .and_then(|k| dict.string_table.get(k))
            .ok_or_else(|| {
                Error::Invalid(format!("string index {} out of range", kv.key_strindex))
            })?;
        if let Some(value) = kv
            .value
            .as_ref()
            .and_then(|v| any_value(v, &dict.string_table))
        {
            if !key.is_empty() {
                out.push(strings.label(key, &value));
            }
        }
    }
    Ok(out)
}

/// Scalar attribute values as text (strings may sit in the dictionary's
/// string table); arrays and maps are not label values.
fn any_value(v: &AnyValue, strings: &[String]) -> Option<String> {
    Some(match v.value.as_ref()? {
        Value::StringValue(s) => s.clone(),
        Value::StringValueStrindex(i) => strings.get(usize::try_from(*i).ok()?)?.clone(),
        Value::BoolValue(b) => b.to_string(),
        Value::IntValue(i) => i.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        Value::BytesValue(b) => hex(b),
        Value::ArrayValue(_) | Value::KvlistValue(_) => return None,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
