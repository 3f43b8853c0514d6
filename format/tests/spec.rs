//! Checks that `FORMAT.md`, the normative specification of the `.cimg` format, matches the code.
//!
//! - Every `### Record: NAME (N bytes)` heading and the `| field | offset | size | meaning |`
//!   table after it must agree with `cimg_format::layout::records()`: the same set of records,
//!   the same sizes, and the same fields (names, offsets, sizes) in the same order.
//! - The records of the code have no padding, as the spec says.
//! - The constants table (`| constant | value | meaning |`) matches the constants of
//!   `layout`, and the file-type table matches `FileKind` (kind bytes and mode bits).
//! - An image produced by the writer satisfies the byte-level rules of the spec (checksums,
//!   digest byte order, padding, block encoding), read using only the offsets the spec gives.

use cimg_format::FileKind;
use cimg_format::layout;
use std::collections::{BTreeMap, BTreeSet};

const SPEC_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/FORMAT.md");

fn spec_text() -> String {
    std::fs::read_to_string(SPEC_PATH).unwrap_or_else(|e| panic!("cannot read {SPEC_PATH}: {e}"))
}

/// Cells of a markdown table row, trimmed, with surrounding backticks removed. `\|` is kept as
/// a literal pipe inside a cell.
fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|');
    let inner = inner.strip_suffix('|').unwrap_or(inner);
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                cur.push('|');
                chars.next();
            }
            '|' => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter()
        .map(|c| {
            let c = c.trim();
            c.strip_prefix('`')
                .and_then(|c| c.strip_suffix('`'))
                .unwrap_or(c)
                .to_string()
        })
        .collect()
}

fn is_separator(cells: &[String]) -> bool {
    cells
        .iter()
        .all(|c| !c.is_empty() && c.chars().all(|ch| matches!(ch, '-' | ':')))
}

/// A markdown table: its header cells and its rows (each with its 1-based line number).
struct MdTable {
    header: Vec<String>,
    rows: Vec<(usize, Vec<String>)>,
}

/// The table starting at or after line index `start` (skipping blank lines only).
fn table_at(lines: &[&str], start: usize) -> Result<MdTable, String> {
    let mut i = start;
    while i < lines.len() && lines[i].trim().is_empty() {
        i += 1;
    }
    if i >= lines.len() || !lines[i].trim_start().starts_with('|') {
        return Err(format!("line {}: expected a table", i + 1));
    }
    let header = cells(lines[i]);
    if i + 1 >= lines.len() || !is_separator(&cells(lines[i + 1])) {
        return Err(format!(
            "line {}: table header not followed by a separator row",
            i + 2
        ));
    }
    let mut rows = Vec::new();
    i += 2;
    while i < lines.len() && lines[i].trim_start().starts_with('|') {
        rows.push((i + 1, cells(lines[i])));
        i += 1;
    }
    Ok(MdTable { header, rows })
}

/// All tables of the spec whose header is exactly `header`.
fn tables_with_header(text: &str, header: &[&str]) -> Vec<MdTable> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for i in 0..lines.len() {
        let starts = lines[i].trim_start().starts_with('|')
            && (i == 0 || !lines[i - 1].trim_start().starts_with('|'));
        if starts && cells(lines[i]) == header {
            out.push(table_at(&lines, i).unwrap_or_else(|e| panic!("{SPEC_PATH}: {e}")));
        }
    }
    out
}

/// One `### Record:` section of the spec.
struct SpecRecord {
    name: String,
    size: usize,
    line: usize,
    fields: Vec<SpecField>,
}

struct SpecField {
    name: String,
    offset: usize,
    size: usize,
    line: usize,
}

const RECORD_HEADER: [&str; 4] = ["field", "offset", "size", "meaning"];

fn parse_decimal(s: &str, what: &str, line: usize) -> Result<usize, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("line {line}: {what} {s:?} is not a decimal number"));
    }
    s.parse()
        .map_err(|e| format!("line {line}: {what} {s:?}: {e}"))
}

/// Parse every `### Record: NAME (N bytes)` heading and the table that follows it.
fn parse_records(text: &str) -> Result<Vec<SpecRecord>, String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let Some(rest) = l.trim_end().strip_prefix("### Record:") else {
            continue;
        };
        let line = i + 1;
        let bad_heading =
            || format!("line {line}: heading {l:?} is not `### Record: NAME (N bytes)`");
        let (name, size) = rest.trim().split_once(" (").ok_or_else(bad_heading)?;
        let size = size.strip_suffix(" bytes)").ok_or_else(bad_heading)?;
        let name = name.trim();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(bad_heading());
        }
        let size = parse_decimal(size, "record size", line)?;
        let table = table_at(&lines, i + 1).map_err(|e| format!("record {name}: {e}"))?;
        if table.header != RECORD_HEADER {
            return Err(format!(
                "record {name} (line {line}): table columns are {:?}, expected {RECORD_HEADER:?}",
                table.header
            ));
        }
        let mut fields = Vec::new();
        for (fl, row) in table.rows {
            if row.len() != 4 {
                return Err(format!(
                    "record {name}, line {fl}: {} cells, expected 4",
                    row.len()
                ));
            }
            fields.push(SpecField {
                name: row[0].clone(),
                offset: parse_decimal(&row[1], &format!("{name}.{} offset", row[0]), fl)?,
                size: parse_decimal(&row[2], &format!("{name}.{} size", row[0]), fl)?,
                line: fl,
            });
        }
        out.push(SpecRecord {
            name: name.to_string(),
            size,
            line,
            fields,
        });
    }
    Ok(out)
}

fn spec_records() -> Vec<SpecRecord> {
    parse_records(&spec_text()).unwrap_or_else(|e| panic!("{SPEC_PATH}: {e}"))
}

/// Differences between one spec record and the code's, as messages.
fn diff_fields(spec: &SpecRecord, code: &[(&str, usize, usize)], problems: &mut Vec<String>) {
    let name = &spec.name;
    let code_names: Vec<&str> = code.iter().map(|f| f.0).collect();
    let spec_names: Vec<&str> = spec.fields.iter().map(|f| f.name.as_str()).collect();
    let mut seen = BTreeSet::new();
    for f in &spec.fields {
        if !seen.insert(f.name.as_str()) {
            problems.push(format!(
                "{name}.{}: listed twice in the spec (line {})",
                f.name, f.line
            ));
        }
        match code.iter().find(|c| c.0 == f.name) {
            None => problems.push(format!(
                "{name}.{}: in the spec (line {}) but not a field of the struct",
                f.name, f.line
            )),
            Some(&(_, off, size)) => {
                if off != f.offset {
                    problems.push(format!(
                        "{name}.{}: offset {} in the spec (line {}), {off} in the code",
                        f.name, f.offset, f.line
                    ));
                }
                if size != f.size {
                    problems.push(format!(
                        "{name}.{}: size {} in the spec (line {}), {size} in the code",
                        f.name, f.size, f.line
                    ));
                }
            }
        }
    }
    for c in code {
        if !spec_names.contains(&c.0) {
            problems.push(format!(
                "{name}.{}: field of the struct (offset {}, size {}) missing from the spec table",
                c.0, c.1, c.2
            ));
        }
    }
    let same_set =
        spec_names.len() == code_names.len() && code_names.iter().all(|c| spec_names.contains(c));
    if same_set && spec_names != code_names {
        problems.push(format!(
            "{name}: fields in a different order; spec: {spec_names:?}, code: {code_names:?}"
        ));
    }
}

#[test]
fn records_match_code() {
    let spec = spec_records();
    let code = layout::records();
    let mut problems = Vec::new();
    let mut spec_by_name: BTreeMap<&str, &SpecRecord> = BTreeMap::new();
    for r in &spec {
        if let Some(prev) = spec_by_name.insert(r.name.as_str(), r) {
            problems.push(format!(
                "record {}: specified twice (lines {} and {})",
                r.name, prev.line, r.line
            ));
        }
    }
    for (name, size, fields) in &code {
        match spec_by_name.get(name) {
            None => problems.push(format!(
                "record {name} ({size} bytes): in the code but has no `### Record: {name} ({size} bytes)` section"
            )),
            Some(s) => {
                if s.size != *size {
                    problems.push(format!(
                        "record {name}: {} bytes in the spec heading (line {}), {size} in the code",
                        s.size, s.line
                    ));
                }
                diff_fields(s, fields, &mut problems);
            }
        }
    }
    for s in &spec {
        if !code.iter().any(|c| c.0 == s.name) {
            problems.push(format!(
                "record {} (line {}): in the spec but not in layout::records()",
                s.name, s.line
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "FORMAT.md and layout.rs disagree:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn records_have_no_padding() {
    let mut problems = Vec::new();
    for (name, size, fields) in layout::records() {
        let mut end = 0;
        for (f, off, fsize) in &fields {
            if *off != end {
                problems.push(format!(
                    "{name}.{f}: at offset {off}, previous field ends at {end}"
                ));
            }
            end = off + fsize;
        }
        if end != size {
            problems.push(format!(
                "{name}: fields end at {end}, record is {size} bytes"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "records with padding:\n  {}",
        problems.join("\n  ")
    );
}

/// A number as the spec writes it: decimal, `0x` hex or `0o` octal.
fn parse_number(s: &str) -> Option<u64> {
    let s = s.replace('_', "");
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if let Some(o) = s.strip_prefix("0o") {
        u64::from_str_radix(o, 8).ok()
    } else {
        s.parse().ok()
    }
}

/// The constants table of the spec, by name: (value text, line).
fn spec_constants() -> BTreeMap<String, (String, usize)> {
    let text = spec_text();
    let tables = tables_with_header(&text, &["constant", "value", "meaning"]);
    assert_eq!(
        tables.len(),
        1,
        "FORMAT.md must have exactly one `| constant | value | meaning |` table"
    );
    let mut out = BTreeMap::new();
    for (line, row) in &tables[0].rows {
        assert_eq!(
            row.len(),
            3,
            "FORMAT.md line {line}: constants row needs 3 cells"
        );
        let prev = out.insert(row[0].clone(), (row[1].clone(), *line));
        assert!(
            prev.is_none(),
            "FORMAT.md line {line}: constant {} listed twice",
            row[0]
        );
    }
    out
}

#[test]
fn constants_match_code() {
    let consts = spec_constants();
    let numeric: [(&str, u64); 11] = [
        ("VERSION_MAJOR", layout::VERSION_MAJOR.into()),
        ("VERSION_MINOR", layout::VERSION_MINOR.into()),
        ("SUPERBLOCK_AREA", layout::SUPERBLOCK_AREA),
        ("MIN_BLOCK_LOG", layout::MIN_BLOCK_LOG.into()),
        ("MAX_BLOCK_LOG", layout::MAX_BLOCK_LOG.into()),
        ("INCOMPAT_META_FRAMES", layout::INCOMPAT_META_FRAMES),
        ("INCOMPAT_KNOWN", layout::INCOMPAT_KNOWN),
        ("MIN_META_FRAME_LOG", layout::MIN_META_FRAME_LOG.into()),
        ("MAX_META_FRAME_LOG", layout::MAX_META_FRAME_LOG.into()),
        ("HOLE", layout::HOLE.into()),
        ("ROOT_INO", layout::ROOT_INO.into()),
    ];
    let mut problems = Vec::new();
    let mut expected: BTreeSet<&str> = numeric.iter().map(|c| c.0).collect();
    expected.insert("MAGIC");
    for name in consts.keys() {
        if !expected.contains(name.as_str()) {
            problems.push(format!(
                "constant {name}: in the spec but not checked against the code"
            ));
        }
    }
    for (name, want) in numeric {
        match consts.get(name) {
            None => problems.push(format!("constant {name}: missing from the spec")),
            Some((text, line)) => match parse_number(text) {
                Some(v) if v == want => {}
                Some(v) => problems.push(format!(
                    "constant {name}: {v} in the spec (line {line}), {want} in the code"
                )),
                None => problems.push(format!(
                    "constant {name}: value {text:?} (line {line}) is not a number"
                )),
            },
        }
    }
    match consts.get("MAGIC") {
        None => problems.push("constant MAGIC: missing from the spec".into()),
        Some((text, line)) => {
            let bytes: Option<Vec<u8>> = text
                .split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).ok())
                .collect();
            if bytes.as_deref() != Some(&layout::MAGIC[..]) {
                problems.push(format!(
                    "constant MAGIC: {text:?} in the spec (line {line}), {:02X?} in the code",
                    layout::MAGIC
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "FORMAT.md constants disagree with layout.rs:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn file_kinds_match_code() {
    let text = spec_text();
    let tables = tables_with_header(
        &text,
        &["FileKind", "kind byte", "mode type bits", "meaning"],
    );
    assert_eq!(
        tables.len(),
        1,
        "FORMAT.md must have exactly one file-type table"
    );
    let mut problems = Vec::new();
    let mut bytes_seen = BTreeSet::new();
    for (line, row) in &tables[0].rows {
        let (name, byte, bits) = (&row[0], parse_number(&row[1]), parse_number(&row[2]));
        let (Some(byte), Some(bits)) = (byte, bits) else {
            problems.push(format!(
                "line {line}: kind byte or mode bits of {name} not a number"
            ));
            continue;
        };
        bytes_seen.insert(byte);
        let Some(kind) = u8::try_from(byte).ok().and_then(FileKind::from_u8) else {
            problems.push(format!(
                "{name}: kind byte {byte} (line {line}) is not a FileKind"
            ));
            continue;
        };
        if format!("{kind:?}") != *name {
            problems.push(format!(
                "kind byte {byte}: {name} in the spec (line {line}), {kind:?} in the code"
            ));
        }
        if u64::from(kind.mode_bits()) != bits {
            problems.push(format!(
                "{name}: mode bits {bits:#o} in the spec (line {line}), {:#o} in the code",
                kind.mode_bits()
            ));
        }
        if u32::try_from(bits).ok().and_then(FileKind::from_mode) != Some(kind) {
            problems.push(format!(
                "{name}: mode bits {bits:#o} do not decode to {kind:?}"
            ));
        }
    }
    let code_bytes: BTreeSet<u64> = (0..=255u8)
        .filter(|&b| FileKind::from_u8(b).is_some())
        .map(u64::from)
        .collect();
    if bytes_seen != code_bytes {
        problems.push(format!(
            "kind bytes: {bytes_seen:?} in the spec, {code_bytes:?} in the code"
        ));
    }
    assert!(
        problems.is_empty(),
        "FORMAT.md file types disagree with the code:\n  {}",
        problems.join("\n  ")
    );
}

/// A record's field, located by the spec's own table.
struct Fields<'a>(&'a SpecRecord);

impl Fields<'_> {
    fn range(&self, field: &str) -> std::ops::Range<usize> {
        let f = self
            .0
            .fields
            .iter()
            .find(|f| f.name == field)
            .unwrap_or_else(|| panic!("FORMAT.md: record {} has no field {field}", self.0.name));
        f.offset..f.offset + f.size
    }
    fn uint(&self, rec: &[u8], field: &str) -> u64 {
        let r = self.range(field);
        assert!(
            r.len() <= 8,
            "{}.{field} is not an integer of at most 8 bytes",
            self.0.name
        );
        let mut b = [0u8; 8];
        b[..r.len()].copy_from_slice(&rec[r]);
        u64::from_le_bytes(b)
    }
}

#[test]
fn written_image_follows_spec() {
    use xxhash_rust::xxh3::{xxh3_64, xxh3_128};
    let recs = spec_records();
    let rec = |n: &str| {
        Fields(
            recs.iter()
                .find(|r| r.name == n)
                .unwrap_or_else(|| panic!("no record {n}")),
        )
    };
    let (sbf, mhf, tf, bf) = (
        rec("Superblock"),
        rec("MetaHeader"),
        rec("Table"),
        rec("Block"),
    );
    let consts = spec_constants();
    let area = consts
        .get("SUPERBLOCK_AREA")
        .and_then(|v| parse_number(&v.0))
        .expect("SUPERBLOCK_AREA");

    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).expect("mkdir");
    let big: Vec<u8> = (0..10_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(src.join("big"), &big).expect("write");
    std::fs::write(src.join("sub/small"), b"hello, world\n").expect("write");
    std::fs::write(src.join("zeros"), vec![0u8; 8192]).expect("write");
    std::fs::write(src.join("text"), "compressible ".repeat(1000)).expect("write");
    let out = dir.path().join("img.cimg");
    let opts = cimg_format::PackOptions {
        block_log: 12,
        threads: 2,
        hot: vec![b"sub/small".to_vec()],
        ..Default::default()
    };
    cimg_format::pack_dir(&src, &out, &opts, &|_, _| {}).expect("pack");
    let file = std::fs::read(&out).expect("read image");

    let sb = &file[..sbf.0.size];
    let hex = consts
        .get("MAGIC")
        .expect("MAGIC")
        .0
        .split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("hex"))
        .collect::<Vec<_>>();
    assert_eq!(&sb[sbf.range("magic")], &hex[..], "magic");
    let ck = sbf.range("checksum");
    assert_eq!(
        sbf.uint(sb, "checksum"),
        xxh3_64(&sb[..ck.start]),
        "superblock checksum covers bytes 0..{}",
        ck.start
    );
    let data_offset = sbf.uint(sb, "data_offset");
    assert_eq!(data_offset, area, "data starts at SUPERBLOCK_AREA");
    assert!(
        file[sbf.0.size..data_offset as usize]
            .iter()
            .all(|&b| b == 0),
        "superblock area padding is zero"
    );
    assert_eq!(sbf.uint(sb, "image_size"), file.len() as u64, "image_size");
    assert_eq!(sbf.uint(sb, "reserved0"), 0, "reserved0");
    assert_eq!(
        sbf.uint(sb, "incompat"),
        0,
        "metadata of one frame sets no incompat bit"
    );
    assert_eq!(sbf.uint(sb, "meta_frame_log"), 0, "meta_frame_log");
    assert_eq!(sbf.uint(sb, "reserved1"), 0, "reserved1");
    let digest = xxh3_128(&file[data_offset as usize..]).to_le_bytes();
    assert_eq!(
        &sb[sbf.range("digest")],
        &digest[..],
        "digest is xxh3-128 of data_offset..image_size, little-endian"
    );

    let (mo, ml) = (
        sbf.uint(sb, "meta_offset") as usize,
        sbf.uint(sb, "meta_stored_len") as usize,
    );
    assert!(
        mo as u64 >= data_offset + sbf.uint(sb, "data_len"),
        "metadata follows the data"
    );
    let stored = &file[mo..mo + ml];
    assert_eq!(
        sbf.uint(sb, "meta_checksum"),
        xxh3_64(stored),
        "metadata checksum"
    );
    let meta = zstd::stream::decode_all(stored).expect("metadata is zstd");
    assert_eq!(
        meta.len() as u64,
        sbf.uint(sb, "meta_raw_len"),
        "meta_raw_len"
    );

    let table = |name: &str| -> (usize, usize) {
        let t = &meta[mhf.range(name)];
        (tf.uint(t, "offset") as usize, tf.uint(t, "count") as usize)
    };
    for t in ["inodes", "dirents", "chunks", "blocks", "xattrs", "blob"] {
        assert_eq!(table(t).0 % 8, 0, "writer aligns the {t} table to 8 bytes");
    }
    let bs = 1u64 << sbf.uint(sb, "block_log");
    let (boff, bcount) = table("blocks");
    assert!(bcount > 0, "the image stores blocks");
    assert!(
        sbf.uint(sb, "hot_blocks") >= 1 && sbf.uint(sb, "hot_blocks") <= bcount as u64,
        "hot_blocks"
    );
    for i in 0..bcount {
        let b = &meta[boff + i * bf.0.size..][..bf.0.size];
        let (off, st, raw) = (
            bf.uint(b, "offset") as usize,
            bf.uint(b, "stored_len") as usize,
            bf.uint(b, "raw_len") as usize,
        );
        let bytes = &file[off..off + st];
        assert_eq!(bf.uint(b, "checksum"), xxh3_64(bytes), "block {i} checksum");
        assert!(
            st >= 1 && st <= raw && raw as u64 <= bs,
            "block {i} lengths {st}/{raw}"
        );
        let content = if st == raw {
            bytes.to_vec()
        } else {
            zstd::stream::decode_all(bytes).expect("zstd block")
        };
        assert_eq!(content.len(), raw, "block {i} decompresses to raw_len");
    }
}

#[test]
fn framed_metadata_follows_spec() {
    use xxhash_rust::xxh3::xxh3_64;
    let recs = spec_records();
    let sbf = Fields(
        recs.iter()
            .find(|r| r.name == "Superblock")
            .expect("no Superblock record"),
    );
    let consts = spec_constants();
    let constant = |n: &str| {
        consts
            .get(n)
            .and_then(|v| parse_number(&v.0))
            .unwrap_or_else(|| panic!("constant {n}"))
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    for d in 0..20 {
        let sub = src.join(format!("directory-{d:03}"));
        std::fs::create_dir_all(&sub).expect("mkdir");
        for f in 0..40 {
            std::fs::write(sub.join(format!("file-{f:03}")), format!("{d} {f}\n")).expect("write");
        }
    }
    let pack = |log: u8| {
        let out = dir.path().join(format!("img-{log}.cimg"));
        let opts = cimg_format::PackOptions {
            threads: 3,
            meta_frame_log: log,
            ..Default::default()
        };
        cimg_format::pack_dir(&src, &out, &opts, &|_, _| {}).expect("pack");
        std::fs::read(&out).expect("read image")
    };
    let log = constant("MIN_META_FRAME_LOG") as u8;
    let file = pack(log);
    let one = pack(20);
    let sb = &file[..sbf.0.size];
    assert_eq!(
        sbf.uint(sb, "incompat"),
        constant("INCOMPAT_META_FRAMES"),
        "framed metadata sets INCOMPAT_META_FRAMES"
    );
    assert_eq!(sbf.uint(sb, "meta_frame_log"), log as u64, "meta_frame_log");

    assert_eq!(sbf.uint(sb, "reserved0"), 0, "reserved0");
    let (mo, ml, raw_len) = (
        sbf.uint(sb, "meta_offset") as usize,
        sbf.uint(sb, "meta_stored_len") as usize,
        sbf.uint(sb, "meta_raw_len") as usize,
    );
    let stored = &file[mo..mo + ml];
    assert_eq!(sbf.uint(sb, "meta_checksum"), xxh3_64(stored), "checksum");
    // Frame by frame: each a complete zstd frame of F bytes (the last the rest).
    let f = 1usize << log;
    let count = raw_len.div_ceil(f);
    assert!(
        count > 1,
        "the test tree needs several frames ({raw_len} bytes)"
    );
    let mut pos = 0;
    let mut meta = Vec::new();
    for k in 0..count {
        let n = zstd::zstd_safe::find_frame_compressed_size(&stored[pos..]).expect("a frame");
        let piece = zstd::stream::decode_all(&stored[pos..pos + n]).expect("frame decodes");
        assert_eq!(piece.len(), f.min(raw_len - k * f), "frame {k} length");
        meta.extend(piece);
        pos += n;
    }
    assert_eq!(pos, ml, "nothing after the last frame");
    // The same metadata as the one-frame image of the same tree, which sets no bit.
    let sb1 = &one[..sbf.0.size];
    assert_eq!(sbf.uint(sb1, "incompat"), 0, "one frame: no incompat bit");
    let (mo1, ml1) = (
        sbf.uint(sb1, "meta_offset") as usize,
        sbf.uint(sb1, "meta_stored_len") as usize,
    );
    let meta1 = zstd::stream::decode_all(&one[mo1..mo1 + ml1]).expect("one frame");
    assert_eq!(meta, meta1, "framing does not change the metadata");
    // And both read the same.
    let a = cimg_format::Image::from_reader(file, "framed", &Default::default()).expect("open");
    let b = cimg_format::Image::from_reader(one, "one", &Default::default()).expect("open");
    let walk = |img: &cimg_format::Image<Vec<u8>>| {
        let mut out = Vec::new();
        img.walk(|p, e| {
            out.push((p.to_vec(), e.ino));
            Ok(())
        })
        .expect("walk");
        out
    };
    assert_eq!(walk(&a), walk(&b));
}
