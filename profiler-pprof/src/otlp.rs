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
    /// The OTLP `profile_id` in hex, if set (an id of only zero bytes is no id: it
    /// would make every later profile sent with it a duplicate).
    pub profile_id: Option<String>,
}

/// Converts the request's profiles one at a time and hands each to `each`. Each
/// converted profile holds only the part of the shared dictionary its own samples
/// use, so converting a request takes time and memory in proportion to the request,
/// not to its profiles times its dictionary (a 2 MB request of 500,000 tiny profiles
/// and a 100,000-string dictionary asked for terabytes when each profile got a copy).
pub fn for_each_profile<E: From<Error>>(
    request: &ExportProfilesServiceRequest,
    mut each: impl FnMut(ResourceProfile) -> Result<(), E>,
) -> Result<(), E> {
    let has_samples = request
        .resource_profiles
        .iter()
        .flat_map(|r| &r.scope_profiles)
        .flat_map(|s| &s.profiles)
        .any(|p| !p.samples.is_empty());
    let dict = match &request.dictionary {
        Some(d) if !d.string_table.is_empty() => d,
        _ if !has_samples => return Ok(()),
        _ => {
            return Err(Error::Invalid(format!(
                "profiles without a shared dictionary: an earlier development layout of OTLP profiles; this server accepts {ACCEPTED_VERSION}"
            ))
            .into())
        }
    };
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
            let id = &p.profile_id;
            each(ResourceProfile {
                resource: resource.clone(),
                profile: Compact::new(dict).profile(p)?,
                profile_id: id.iter().any(|&b| b != 0).then(|| hex(id)),
            })?;
        }
    }
    Ok(())
}

/// One profile's pprof tables, built from the dictionary entries its samples reach:
/// pprof ids are assigned in the order entries are first used.
struct Compact<'a> {
    dict: &'a ProfilesDictionary,
    strings: Vec<String>,
    string_ids: HashMap<String, i64>,
    functions: Vec<Function>,
    function_ids: HashMap<i32, u64>,
    mappings: Vec<Mapping>,
    mapping_ids: HashMap<i32, u64>,
    locations: Vec<Location>,
    location_ids: HashMap<i32, u64>,
}

/// Entry `i` of one of the dictionary's tables, `what` naming the table when `i` is out
/// of its range.
fn entry<'t, T>(table: &'t [T], what: &str, i: i32) -> Result<&'t T, Error> {
    usize::try_from(i)
        .ok()
        .and_then(|i| table.get(i))
        .ok_or_else(|| Error::Invalid(format!("{what} index {i} out of range")))
}

impl<'a> Compact<'a> {
    fn new(dict: &'a ProfilesDictionary) -> Self {
        let mut compact = Compact {
            dict,
            strings: Vec::new(),
            string_ids: HashMap::new(),
            functions: Vec::new(),
            function_ids: HashMap::new(),
            mappings: Vec::new(),
            mapping_ids: HashMap::new(),
            locations: Vec::new(),
            location_ids: HashMap::new(),
        };
        // pprof's string 0 is the empty string.
        compact.intern("");
        compact
    }

    fn intern(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.string_ids.get(s) {
            return i;
        }
        let i = self.strings.len() as i64;
        self.strings.push(s.to_owned());
        self.string_ids.insert(s.to_owned(), i);
        i
    }

    /// The dictionary's string `i`, in this profile's table.
    fn string(&mut self, i: i32) -> Result<i64, Error> {
        let dict = self.dict;
        let s = entry(&dict.string_table, "string", i)?;
        Ok(self.intern(s))
    }

    fn label(&mut self, key: &str, value: &str) -> Label {
        Label {
            key: self.intern(key),
            str: self.intern(value),
            ..Label::default()
        }
    }

    fn function(&mut self, i: i32) -> Result<u64, Error> {
        if let Some(&id) = self.function_ids.get(&i) {
            return Ok(id);
        }
        let dict = self.dict;
        let f = entry(&dict.function_table, "function", i)?;
        let id = self.functions.len() as u64 + 1;
        let function = Function {
            id,
            name: self.string(f.name_strindex)?,
            system_name: self.string(f.system_name_strindex)?,
            filename: self.string(f.filename_strindex)?,
            start_line: f.start_line,
        };
        self.functions.push(function);
        self.function_ids.insert(i, id);
        Ok(id)
    }

    /// Index 0 is the dictionary's null mapping: no mapping (id 0).
    fn mapping(&mut self, i: i32) -> Result<u64, Error> {
        if i == 0 {
            return Ok(0);
        }
        if let Some(&id) = self.mapping_ids.get(&i) {
            return Ok(id);
        }
        let dict = self.dict;
        let m = entry(&dict.mapping_table, "mapping", i)?;
        let id = self.mappings.len() as u64 + 1;
        let mapping = Mapping {
            id,
            memory_start: m.memory_start,
            memory_limit: m.memory_limit,
            file_offset: m.file_offset,
            filename: self.string(m.filename_strindex)?,
            ..Mapping::default()
        };
        self.mappings.push(mapping);
        self.mapping_ids.insert(i, id);
        Ok(id)
    }

    fn location(&mut self, i: i32) -> Result<u64, Error> {
        if let Some(&id) = self.location_ids.get(&i) {
            return Ok(id);
        }
        let dict = self.dict;
        let l = entry(&dict.location_table, "location", i)?;
        let mapping_id = self.mapping(l.mapping_index)?;
        let line = l
            .lines
            .iter()
            .map(|line| {
                Ok(Line {
                    function_id: self.function(line.function_index)?,
                    line: line.line,
                    column: line.column,
                })
            })
            .collect::<Result<_, Error>>()?;
        let id = self.locations.len() as u64 + 1;
        self.locations.push(Location {
            id,
            mapping_id,
            address: l.address,
            line,
            is_folded: false,
        });
        self.location_ids.insert(i, id);
        Ok(id)
    }

    fn value_type(&mut self, v: &Option<otlp::ValueType>) -> Result<Option<ValueType>, Error> {
        v.as_ref()
            .map(|v| {
                Ok(ValueType {
                    r#type: self.string(v.type_strindex)?,
                    unit: self.string(v.unit_strindex)?,
                })
            })
            .transpose()
    }

    fn profile(mut self, p: &otlp::Profile) -> Result<Profile, Error> {
        let dict = self.dict;
        let sample_type = self
            .value_type(&p.sample_type)?
            .ok_or_else(|| Error::Invalid("profile has no sample type".into()))?;
        let period_type = self.value_type(&p.period_type)?;
        let common = self.attributes(&p.attribute_indices)?;
        let mut samples = Vec::with_capacity(p.samples.len());
        for s in &p.samples {
            let stack = entry(&dict.stack_table, "stack", s.stack_index)?;
            let location_id = stack
                .location_indices
                .iter()
                .map(|&i| self.location(i))
                .collect::<Result<_, Error>>()?;
            // Events without values count one each.
            let value = if s.values.is_empty() {
                s.timestamps_unix_nano.len() as i64
            } else {
                s.values.iter().fold(0i64, |a, v| a.saturating_add(*v))
            };
            let mut label = common.clone();
            label.extend(self.attributes(&s.attribute_indices)?);
            if s.link_index > 0 {
                let link = entry(&dict.link_table, "link", s.link_index)?;
                for (key, bytes) in [("trace_id", &link.trace_id), ("span_id", &link.span_id)] {
                    if !bytes.is_empty() {
                        label.push(self.label(key, &hex(bytes)));
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
            mapping: self.mappings,
            location: self.locations,
            function: self.functions,
            time_nanos: p.time_unix_nano as i64,
            duration_nanos: p.duration_nano as i64,
            period_type,
            period: p.period,
            string_table: self.strings,
            ..Profile::default()
        })
    }

    fn attributes(&mut self, indices: &[i32]) -> Result<Vec<Label>, Error> {
        let dict = self.dict;
        let mut out = Vec::with_capacity(indices.len());
        for &i in indices {
            let kv = entry(&dict.attribute_table, "attribute", i)?;
            let key = entry(&dict.string_table, "string", kv.key_strindex)?;
            if let Some(value) = kv
                .value
                .as_ref()
                .and_then(|v| any_value(v, &dict.string_table))
            {
                if !key.is_empty() {
                    out.push(self.label(key, &value));
                }
            }
        }
        Ok(out)
    }
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

/// A process context (OTEP 4719: an `opentelemetry.proto.resource.v1.Resource` an SDK
/// publishes in memory for readers outside the process), as a profiler reads it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProcessContext {
    /// Scalar resource attributes as text (`service.name`, ...), `threadlocal.*` left out.
    pub attributes: Vec<(String, String)>,
    /// `threadlocal.schema_version` (OTEP 4947): how threads publish their context.
    pub thread_schema: Option<String>,
    /// `threadlocal.attribute_key_map`: thread-context attribute names by key index.
    pub thread_keys: Vec<String>,
}

/// Decodes a process context's payload.
pub fn process_context(payload: &[u8]) -> Result<ProcessContext, Error> {
    use prost::Message as _;
    let resource = opentelemetry_proto::tonic::resource::v1::Resource::decode(payload)?;
    let mut context = ProcessContext::default();
    for kv in resource.attributes {
        let Some(value) = kv.value else { continue };
        match (kv.key.as_str(), value.value) {
            ("threadlocal.schema_version", Some(Value::StringValue(schema))) => context.thread_schema = Some(schema),
            ("threadlocal.attribute_key_map", Some(Value::ArrayValue(keys))) => {
                // A key that is not a string keeps its index, named by nothing.
                context.thread_keys = keys
                    .values
                    .iter()
                    .map(|v| match &v.value {
                        Some(Value::StringValue(s)) => s.clone(),
                        _ => String::new(),
                    })
                    .collect();
            }
            (key, _) if key.starts_with("threadlocal.") => {}
            (key, value) => {
                if let Some(text) = any_value(&AnyValue { value }, &[]) {
                    context.attributes.push((key.to_owned(), text));
                }
            }
        }
    }
    Ok(context)
}
