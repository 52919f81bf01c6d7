//! Repository hygiene: the spec tracks the format code, no test is switched
//! off, and Rust sources are plain ASCII.

use std::path::{Path, PathBuf};

/// The files whose every byte the spec (journal-format.md) describes.
const FORMAT_SOURCES: [&str; 3] = [
    "src/journal/format.rs",
    "src/journal/payload.rs",
    "src/journal/progress.rs",
];
/// The spec.
const SPEC: &str = "journal-format.md";
/// How the spec states the hash of [`FORMAT_SOURCES`].
const HASH_LINE_PREFIX: &str = "format.rs, payload.rs and progress.rs hash: ";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> Vec<u8> {
    let path = root().join(relative);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// 64-bit FNV-1a: offset basis 0xcbf29ce484222325, prime 0x100000001b3.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Every file under `dir` (relative to the crate root), recursively, sorted.
fn files_under(dir: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let entries =
            std::fs::read_dir(dir).unwrap_or_else(|e| panic!("list {}: {e}", dir.display()));
        for entry in entries {
            let entry = entry.expect("directory entry");
            let path = entry.path();
            if entry.file_type().expect("file type").is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root().join(dir), &mut out);
    out.sort();
    out
}

fn source_files() -> Vec<PathBuf> {
    let mut files = files_under("src");
    files.extend(files_under("tests"));
    assert!(
        files.iter().any(|p| p.ends_with("tests/it/tidy.rs")),
        "the walk must see this file"
    );
    files
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

#[test]
fn fnv1a64_known_values() {
    assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
}

#[test]
fn spec_names_the_hash_of_the_format_sources() {
    let mut contents = Vec::new();
    for file in FORMAT_SOURCES {
        contents.extend(read(file));
    }
    let expected = format!("{HASH_LINE_PREFIX}{:016x}", fnv1a64(&contents));
    let spec = String::from_utf8(read(SPEC)).expect("the spec is UTF-8");
    let stated = spec
        .lines()
        .find(|line| line.starts_with(HASH_LINE_PREFIX))
        .unwrap_or("(no such line)");
    assert!(
        spec.lines().any(|line| line == expected),
        "{} changed since {SPEC} was last checked against them.\n\
         Update {SPEC} (every byte, offset and rule it states) and the golden \
         vectors in tests/it/golden.rs to match the code, and only then set the \
         hash line in {SPEC} to:\n    {expected}\n(it now says: {stated})",
        FORMAT_SOURCES.join(" or "),
    );
}

#[test]
fn no_test_is_ignored() {
    // Built so that this file does not contain the needle itself.
    let needle = concat!("#[", "ignore").as_bytes();
    let mut found = Vec::new();
    for path in source_files() {
        let bytes = std::fs::read(&path).expect("read");
        for (at, window) in bytes.windows(needle.len()).enumerate() {
            let next = bytes.get(at + needle.len()).copied();
            if window == needle && matches!(next, Some(b']' | b'=' | b' ' | b'\t' | b'(')) {
                let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count();
                found.push(format!("{}:{line}", relative(&path)));
            }
        }
    }
    assert!(
        found.is_empty(),
        "tests must run or be deleted, not be switched off; ignore attributes at:\n  {}",
        found.join("\n  ")
    );
}

#[test]
fn rust_sources_are_ascii() {
    let mut found = Vec::new();
    for path in source_files() {
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let bytes = std::fs::read(&path).expect("read");
        for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
            if let Some(col) = line.iter().position(|b| !b.is_ascii()) {
                found.push(format!(
                    "{}:{}:{}: {}",
                    relative(&path),
                    n + 1,
                    col + 1,
                    String::from_utf8_lossy(line).trim()
                ));
            }
        }
    }
    assert!(
        found.is_empty(),
        "Rust sources must be ASCII-only; non-ASCII bytes at:\n  {}",
        found.join("\n  ")
    );
}

/// The rows of the markdown table that follows `heading` in the spec, split
/// into trimmed cells; the header and separator rows are skipped.
fn spec_table(heading: &str) -> Vec<Vec<String>> {
    let spec = String::from_utf8(read(SPEC)).expect("the spec is UTF-8");
    let start = spec
        .find(heading)
        .unwrap_or_else(|| panic!("{SPEC} has no heading {heading:?}"));
    spec[start..]
        .lines()
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        .skip(2)
        .map(|line| {
            line.trim_matches('|')
                .split('|')
                .map(|cell| cell.trim().to_string())
                .collect()
        })
        .collect()
}

/// The fields of a value's derived `Debug` output (`Name { a: x, b: [y, z] }`),
/// as (name, value text) pairs. Lets the spec be compared with a struct
/// whatever fields it has today.
fn debug_fields(debug: &str) -> Vec<(String, String)> {
    let body = debug
        .split_once(" { ")
        .and_then(|(_, rest)| rest.strip_suffix(" }"))
        .unwrap_or_else(|| panic!("not a derived Debug struct: {debug}"));
    let mut fields = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (name, after) = rest.split_once(": ").expect("field name");
        let (mut depth, mut quoted, mut escaped, mut end) = (0i32, false, false, after.len());
        for (i, c) in after.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '[' | '(' | '{' if !quoted => depth += 1,
                ']' | ')' | '}' if !quoted => depth -= 1,
                ',' if !quoted && depth == 0 => {
                    end = i;
                    break;
                }
                _ => {}
            }
        }
        fields.push((name.to_string(), after[..end].to_string()));
        rest = after[end..].trim_start_matches(", ");
    }
    fields
}

#[test]
fn debug_fields_parses_derived_debug() {
    #[derive(Debug)]
    #[allow(dead_code)] // Read through Debug only.
    struct T {
        a: &'static [bool],
        b: &'static str,
        c: Option<(u8, u8)>,
    }
    let t = T {
        a: &[true, false],
        b: "x, \"y\": z",
        c: Some((1, 2)),
    };
    let fields = debug_fields(&format!("{t:?}"));
    let names: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(fields[0].1, "[true, false]");
    assert_eq!(fields[2].1, "Some((1, 2))");
}

#[test]
fn spec_evidence_fields_are_the_code_fields() {
    let (disk, _journal) = crate::support::sim_journal(livecopy::journal::Phase::Ready);
    let analysis = livecopy::journal::analyse(&disk).expect("analyse");
    let evidence = analysis.evidence.expect("evidence");
    let code: Vec<String> = debug_fields(&format!("{evidence:?}"))
        .into_iter()
        .map(|(name, _)| format!("`{name}`"))
        .collect();
    let spec: Vec<String> = spec_table("### 9.3 Evidence")
        .into_iter()
        .map(|cells| cells[0].clone())
        .collect();
    assert_eq!(
        spec, code,
        "{SPEC} section 9.3 must list the fields of recovery::Evidence, in order"
    );
}

#[test]
fn spec_decision_table_is_the_code_table() {
    use livecopy::journal::recovery::{Decision, TABLE};
    let spec = String::from_utf8(read(SPEC)).expect("the spec is UTF-8");
    let heading = "### 9.4 Decision table";
    let columns: Vec<String> = spec[spec.find(heading).expect("section 9.4")..]
        .lines()
        .find(|line| line.starts_with('|'))
        .expect("a table")
        .trim_matches('|')
        .split('|')
        .map(|cell| cell.trim().to_string())
        .collect();
    let rows = spec_table(heading);
    assert_eq!(
        rows.len(),
        TABLE.len(),
        "{SPEC} section 9.4 must list every row of recovery::TABLE"
    );
    for (n, (cells, row)) in rows.iter().zip(TABLE.iter()).enumerate() {
        let at = format!("{SPEC} section 9.4, row {} ({})", n + 1, row.label);
        // The evidence patterns: every field of Row but these three.
        let patterns: Vec<(String, String)> = debug_fields(&format!("{row:?}"))
            .into_iter()
            .filter(|(name, _)| !matches!(name.as_str(), "label" | "decision" | "why"))
            .collect();
        let names: Vec<&str> = patterns.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            columns[2..columns.len() - 2],
            names[..],
            "{SPEC} section 9.4: the columns must be #, Label, the Row pattern fields \
             in order, Decision, Why"
        );
        assert_eq!(cells.len(), columns.len(), "{at}: cells");
        assert_eq!(cells[0], (n + 1).to_string(), "{at}: number");
        assert_eq!(cells[1], format!("`{}`", row.label), "{at}: label");
        for ((name, value), cell) in patterns.iter().zip(&cells[2..]) {
            let spec = if cell == "*" {
                "[]".to_string()
            } else {
                format!("[{cell}]")
            };
            assert_eq!(&spec, value, "{at}: column {name}");
        }
        let decision = match row.decision {
            Decision::Return => "**return**".to_string(),
            Decision::Refuse(reason) => format!("refuse `{}`", reason.name()),
        };
        assert_eq!(cells[cells.len() - 2], decision, "{at}: decision");
        let why = row.why.split_whitespace().collect::<Vec<_>>().join(" ");
        assert_eq!(cells[cells.len() - 1], why, "{at}: why");
    }
}

#[test]
fn spec_transition_table_is_the_code_rule() {
    use livecopy::journal::Phase;
    use livecopy::journal::format::{Frame, Kind, Position};
    use livecopy::journal::recovery::links;

    // Whether recovery accepts `to` after `from`, from the same writer or
    // from a restarted one (new instance, next epoch).
    let accepts = |from: Phase, to: Phase, restart: bool| {
        let parent = livecopy::journal::Record {
            phase: from,
            authoritative: from
                .implied_authority()
                .unwrap_or(livecopy::journal::Side::Source),
            ..crate::support::first_record()
        };
        let mut child = livecopy::journal::Record {
            phase: to,
            authoritative: to
                .implied_authority()
                .unwrap_or(livecopy::journal::Side::Source),
            ..parent.clone()
        };
        if restart {
            child.writer_instance = *b"writer-instance2";
            child.writer_epoch += 1;
        }
        let frame = |seq: u64, parent_crc: u32, r: &livecopy::journal::Record| {
            let bytes = livecopy::journal::payload::encode(r).expect("encodes");
            Frame::new(
                Kind::Record,
                Position::Slot {
                    slot: (seq % 4) as u8,
                    copy: 0,
                },
                crate::support::UUID,
                seq,
                parent_crc,
                bytes,
            )
        };
        let parent_frame = frame(1, 0x1234_5678, &parent);
        let child_frame = frame(2, parent_frame.content_crc, &child);
        links(&parent_frame, &parent, &child_frame, &child)
    };
    let rows = spec_table("### 7.2 Allowed phase transitions");
    assert_eq!(
        rows.len(),
        Phase::ALL.len(),
        "{SPEC} section 7.2: one row per phase"
    );
    for (cells, from) in rows.iter().zip(Phase::ALL) {
        assert_eq!(
            cells[0],
            format!("{from:?}"),
            "{SPEC} section 7.2: row order"
        );
        assert_eq!(cells.len(), 1 + Phase::ALL.len());
        for (cell, to) in cells[1..].iter().zip(Phase::ALL) {
            let spec = match cell.as_str() {
                "-" => (false, false),
                "restart only" => (false, true),
                c if c.starts_with("yes") => (true, true),
                other => panic!("{SPEC} section 7.2: unknown cell {other:?}"),
            };
            let code = (accepts(from, to, false), accepts(from, to, true));
            assert_eq!(
                spec, code,
                "{SPEC} section 7.2, {from:?} -> {to:?}: (same writer, restart) differ"
            );
        }
    }
}
