//! Pyroscope profile type ids for this server's kinds, and back.
//!
//! Pyroscope names a profile type
//! `<name>:<sample_type>:<sample_unit>:<period_type>:<period_unit>`. Grafana
//! lists it as `<name> - <sample_type>`, groups the list by name and reads
//! the unit from the third field. A kind `<name>:<rest>` becomes name and
//! sample type (`off-cpu:blocked-io` -> `off-cpu:blocked-io:nanoseconds:cpu:nanoseconds`);
//! a kind without `:` is both (`on-cpu` -> `on-cpu:on-cpu:nanoseconds:cpu:nanoseconds`,
//! `alloc_space` -> `alloc_space:alloc_space:bytes:space:bytes`). `%` and `:`
//! inside a part are percent-encoded so an id always has five fields.
//!
//! Only the first two fields are read back; the unit is the kind's stored
//! unit and the period follows Pyroscope's habit (`cpu:nanoseconds` for
//! times, `space:bytes` for bytes, `<sample_type>:count` for counts). The one
//! kind shape that does not round-trip is `x:x`, read back as `x`; no ingest
//! path produces it.

use profiler_pprof::pyroscope::types::v1::ProfileType;

use crate::ingest::unit_of;

pub fn of_kind(kind: &str) -> ProfileType {
    let (name, sample_type) = kind.split_once(':').unwrap_or((kind, kind));
    let (name, sample_type) = (escape(name), escape(sample_type));
    let unit = unit_of(kind);
    let period_type = match unit {
        "nanoseconds" => "cpu".to_owned(),
        "bytes" => "space".to_owned(),
        _ => sample_type.clone(),
    };
    ProfileType {
        id: format!("{name}:{sample_type}:{unit}:{period_type}:{unit}"),
        name,
        sample_type,
        sample_unit: unit.to_owned(),
        period_type,
        period_unit: unit.to_owned(),
    }
}

/// The kind a profile type id names.
pub fn kind_of(id: &str) -> Result<String, String> {
    let fields: Vec<&str> = id.split(':').collect();
    let [name, sample_type, _, _, _] = fields[..] else {
        return Err(format!(
            "profile type {id:?} is not <name>:<sample_type>:<sample_unit>:<period_type>:<period_unit>"
        ));
    };
    let (name, sample_type) = (unescape(name, id)?, unescape(sample_type, id)?);
    if name.is_empty() || sample_type.is_empty() {
        return Err(format!(
            "profile type {id:?} has an empty name or sample type"
        ));
    }
    Ok(if name == sample_type {
        name
    } else {
        format!("{name}:{sample_type}")
    })
}

fn escape(part: &str) -> String {
    part.replace('%', "%25").replace(':', "%3A")
}

fn unescape(part: &str, id: &str) -> Result<String, String> {
    let mut out = String::with_capacity(part.len());
    let mut rest = part;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 3).map(str::to_ascii_uppercase);
        out.push(match code.as_deref() {
            Some("25") => '%',
            Some("3A") => ':',
            _ => {
                return Err(format!(
                    "profile type {id:?}: only %25 and %3A may be escaped"
                ))
            }
        });
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip() {
        for kind in [
            "on-cpu",
            "off-cpu:blocked-io",
            "off-cpu:idle-poll",
            "cpu",
            "alloc_space",
            "a:b:c",
            "50%",
            "x:%3A",
        ] {
            assert_eq!(
                kind_of(&of_kind(kind).id).unwrap(),
                kind,
                "{}",
                of_kind(kind).id
            );
        }
    }

    #[test]
    fn ids_read_as_grafana_reads_them() {
        let t = of_kind("off-cpu:blocked-io");
        assert_eq!(t.id, "off-cpu:blocked-io:nanoseconds:cpu:nanoseconds");
        assert_eq!(
            (t.name.as_str(), t.sample_type.as_str()),
            ("off-cpu", "blocked-io")
        );
        assert_eq!(
            of_kind("on-cpu").id,
            "on-cpu:on-cpu:nanoseconds:cpu:nanoseconds"
        );
        assert_eq!(
            of_kind("alloc_space").id,
            "alloc_space:alloc_space:bytes:space:bytes"
        );
        assert_eq!(
            of_kind("goroutine").id,
            "goroutine:goroutine:count:goroutine:count"
        );
        assert_eq!(of_kind("a:b:c").id.split(':').count(), 5);
    }

    #[test]
    fn malformed_ids_are_refused() {
        for id in [
            "",
            "on-cpu",
            "a:b:c:d",
            "a:b:c:d:e:f",
            ":x:u:p:u",
            "a%2:b:u:p:u",
            "a%41:b:u:p:u",
        ] {
            assert!(kind_of(id).is_err(), "{id}");
        }
    }
}
