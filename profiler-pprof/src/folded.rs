//! Folded stacks, the text form of flame graphs: one `root;caller;leaf value`
//! line per stack.
//!
//! `;` separates frames and a line break ends a stack, so neither may appear
//! in a frame name. Names come from symbol tables and third-party pprof
//! (Rust's `<[u8; 8] as Debug>::fmt`), so every folded line the workspace
//! writes, files and exports as well as the lines given to inferno, escapes
//! frames with [`escape_frame`]. The escape is lossy (`;` reads `:`), which a
//! reader of flame graphs does not notice, and keeps each frame one frame.
//!
//! Stacks arrive as `(kind, frames, value)` triples, frames root-first, so the
//! agent's profiles and the server's query results are written without being
//! copied into one shape first.

use std::borrow::Cow;

use crate::kind::root_frame;

/// `frame` with `;` as `:` and line breaks as spaces.
pub fn escape_frame(frame: &str) -> Cow<'_, str> {
    if !frame.contains([';', '\n', '\r']) {
        return Cow::Borrowed(frame);
    }
    Cow::Owned(
        frame
            .chars()
            .map(|c| match c {
                ';' => ':',
                '\n' | '\r' => ' ',
                c => c,
            })
            .collect(),
    )
}

/// The frames of one stack as a folded line holds them: `kind_root`'s root
/// frame first if given, then `frames`, each escaped.
pub fn escaped_frames<'a, F: AsRef<str>>(
    kind_root: Option<&str>,
    frames: &'a [F],
) -> impl Iterator<Item = Cow<'a, str>> {
    let root = kind_root.map(|kind| Cow::Owned(escape_frame(&root_frame(kind)).into_owned()));
    root.into_iter()
        .chain(frames.iter().map(|frame| escape_frame(frame.as_ref())))
}

/// Appends the stack part of a folded line: [`escaped_frames`] joined by `;`.
fn push_stack<F: AsRef<str>>(line: &mut String, kind_root: Option<&str>, frames: &[F]) {
    for (i, frame) in escaped_frames(kind_root, frames).enumerate() {
        if i > 0 {
            line.push(';');
        }
        line.push_str(&frame);
    }
}

/// Folded text of `stacks`: one line per stack, sorted, each ending in a
/// newline. With `kind_roots` each stack starts with its kind's root frame.
/// Every stack given is written, zero values too: filtering is the caller's.
pub fn write<K, S, F>(stacks: impl IntoIterator<Item = (K, S, i64)>, kind_roots: bool) -> String
where
    K: AsRef<str>,
    S: AsRef<[F]>,
    F: AsRef<str>,
{
    let mut lines: Vec<String> = stacks
        .into_iter()
        .map(|(kind, frames, value)| {
            let mut line = String::new();
            push_stack(
                &mut line,
                kind_roots.then_some(kind.as_ref()),
                frames.as_ref(),
            );
            line.push(' ');
            line.push_str(&value.to_string());
            line
        })
        .collect();
    lines.sort_unstable();
    let mut out = lines.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

/// Why a folded line could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum LineError<'a> {
    /// No space before a value.
    MissingValue,
    /// The text after the last space, which is not an integer.
    BadValue(&'a str),
}

/// The frames (root-first) and value of one folded line; the value follows
/// the last space, as frame names may hold spaces. A trailing `\r` is
/// ignored.
pub fn parse_line(line: &str) -> Result<(std::str::Split<'_, char>, i64), LineError<'_>> {
    let line = line.trim_end_matches('\r');
    let (stack, value) = line.rsplit_once(' ').ok_or(LineError::MissingValue)?;
    let value = value
        .trim()
        .parse()
        .map_err(|_| LineError::BadValue(value))?;
    Ok((frames(stack), value))
}

/// The frames of the stack part of a folded line, root-first.
pub fn frames(stack: &str) -> std::str::Split<'_, char> {
    stack.split(';')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_keeps_each_frame_one_frame() {
        assert!(matches!(escape_frame("main"), Cow::Borrowed("main")));
        assert_eq!(
            escape_frame("<[u8; 8] as Debug>::fmt"),
            "<[u8: 8] as Debug>::fmt"
        );
        assert_eq!(escape_frame("a\nb\r\nc;d"), "a b  c:d");
        let mut line = String::new();
        push_stack(&mut line, None, &["app", "<[u8; 8] as Debug>::fmt", "leaf"]);
        assert_eq!(frames(&line).count(), 3);
    }

    #[test]
    fn kind_roots_lead_every_stack_and_lines_are_sorted() {
        let stacks = [
            ("on-cpu", vec!["app", "main", "burn;cpu"], 50),
            (
                "off-cpu:sleep",
                vec!["app", "main", "nap", "do_nanosleep_[k]"],
                700,
            ),
            ("off-cpu:runnable", vec!["app", "main"], 5),
            ("on-cpu", vec!["app", "zero"], 0),
        ];
        assert_eq!(
            write(stacks.iter().cloned(), true),
            "[off-cpu:runnable];app;main 5\n\
             [off-cpu:sleep];app;main;nap;do_nanosleep_[k] 700\n\
             [on-cpu];app;main;burn:cpu 50\n\
             [on-cpu];app;zero 0\n"
        );
        assert_eq!(
            write(stacks.iter().take(1).cloned(), false),
            "app;main;burn:cpu 50\n"
        );
        assert_eq!(write(Vec::<(&str, Vec<&str>, i64)>::new(), true), "");
    }

    #[test]
    fn parses_what_it_writes() {
        let text = write([("on-cpu", ["my app", "a b;c"], -3)], false);
        let (frames, value) = parse_line(text.trim_end()).unwrap();
        assert_eq!(frames.collect::<Vec<_>>(), ["my app", "a b:c"]);
        assert_eq!(value, -3);
        let (frames, value) = parse_line("a;b 2\r").unwrap();
        assert_eq!((frames.collect::<Vec<_>>(), value), (vec!["a", "b"], 2));
        assert_eq!(parse_line("a;b").unwrap_err(), LineError::MissingValue);
        assert_eq!(parse_line("a;b x").unwrap_err(), LineError::BadValue("x"));
    }
}
