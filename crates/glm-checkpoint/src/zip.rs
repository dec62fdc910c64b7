//! Stored (uncompressed) ZIP archives: the container of torch's `.pt` / `.bin` files.
//!
//! Owns: reading an archive's central directory (zip64 included) into each entry's name, size and
//! data range, without reading any data, and checking every range lies inside the file (a
//! truncated download fails here, naming the entry); writing entries whose sizes are known before
//! their data, aligned to 64 bytes as torch aligns them, with zip64 records where sizes or offsets
//! pass 4 GiB. Only the `stored` method is read or written: torch never compresses its records.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::CheckpointError;

const LOCAL: u32 = 0x0403_4b50;
const CENTRAL: u32 = 0x0201_4b50;
const EOCD: u32 = 0x0605_4b50;
const EOCD64: u32 = 0x0606_4b50;
const EOCD64_LOCATOR: u32 = 0x0706_4b50;
const ZIP64_EXTRA: u16 = 0x0001;
/// torch's padding field ("FB"), which puts each record's data at a multiple of 64 bytes.
const PAD_EXTRA: u16 = 0x4246;
pub const ALIGN: u64 = 64;
const MAX32: u64 = 0xffff_ffff;

/// One entry of an archive: where its (stored) bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    /// 0 = stored; anything else cannot be read in place.
    pub method: u16,
    pub size: u64,
    pub crc32: u32,
    /// Offset of the first data byte in the file.
    pub data_start: u64,
}

/// The entries of an archive, every data range checked to lie inside the file.
#[derive(Debug, Clone)]
pub struct ZipIndex {
    pub entries: Vec<Entry>,
    pub file_len: u64,
}

fn bad(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Format { path: path.to_path_buf(), reason: reason.into() }
}

fn io_err(path: &Path, source: io::Error) -> CheckpointError {
    CheckpointError::Io { path: path.to_path_buf(), source }
}

/// Little-endian reads from a byte slice that fail instead of panicking.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(b: &'a [u8], at: usize) -> Self {
        Self { b, at }
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|s| u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes)
    }
}

fn read_at(file: &File, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, CheckpointError> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).map_err(|e| io_err(path, e))?;
    Ok(buf)
}

impl ZipIndex {
    /// Reads the central directory of `file` (at `path`, for messages).
    pub fn read(file: &File, path: &Path) -> Result<Self, CheckpointError> {
        let file_len = file.metadata().map_err(|e| io_err(path, e))?.len();
        let truncated = || {
            bad(path, format!("no ZIP end record in its last bytes ({file_len} bytes): the file is truncated or not a torch zip file"))
        };
        // The end record is 22 bytes plus a comment of at most 65535.
        let tail_len = file_len.min(22 + 65535);
        let tail = read_at(file, path, file_len - tail_len, tail_len as usize)?;
        let pos = (0..tail.len().saturating_sub(21))
            .rev()
            .find(|&i| tail[i..i + 4] == EOCD.to_le_bytes())
            .ok_or_else(truncated)?;
        let eocd_at = file_len - tail_len + pos as u64;
        let mut c = Cursor::new(&tail, pos + 4);
        let (disk, _cd_disk, _n_disk) = (c.u16(), c.u16(), c.u16());
        let (n, cd_size, cd_offset) = (c.u16(), c.u32(), c.u32());
        let (Some(disk), Some(n), Some(cd_size), Some(cd_offset)) = (disk, n, cd_size, cd_offset) else {
            return Err(truncated());
        };
        if disk != 0 {
            return Err(bad(path, "a multi-part ZIP archive; join the parts first"));
        }
        let (mut n, mut cd_size, mut cd_offset) = (n as u64, cd_size as u64, cd_offset as u64);
        if n == 0xffff || cd_size == MAX32 || cd_offset == MAX32 {
            // zip64: a locator right before the end record points at the zip64 end record.
            let loc_at = eocd_at.checked_sub(20).ok_or_else(truncated)?;
            let loc = read_at(file, path, loc_at, 20)?;
            let mut c = Cursor::new(&loc, 0);
            if c.u32() != Some(EOCD64_LOCATOR) {
                return Err(bad(path, "a ZIP end record with zip64 markers but no zip64 locator"));
            }
            let _ = c.u32();
            let at = c.u64().ok_or_else(truncated)?;
            if at.checked_add(56).is_none_or(|end| end > loc_at) {
                return Err(bad(path, format!("the zip64 end record offset {at} is outside the file")));
            }
            let rec = read_at(file, path, at, 56)?;
            let mut c = Cursor::new(&rec, 0);
            if c.u32() != Some(EOCD64) {
                return Err(bad(path, format!("no zip64 end record at offset {at}")));
            }
            let mut c = Cursor::new(&rec, 32);
            (n, cd_size, cd_offset) = (c.u64().unwrap_or(0), c.u64().unwrap_or(0), c.u64().unwrap_or(0));
        }
        if cd_offset.checked_add(cd_size).is_none_or(|end| end > file_len) || cd_size > (1 << 31) {
            return Err(bad(
                path,
                format!(
                    "the central directory ({cd_size} bytes at {cd_offset}) lies outside the file ({file_len} bytes)"
                ),
            ));
        }
        let cd = read_at(file, path, cd_offset, cd_size as usize)?;
        let mut c = Cursor::new(&cd, 0);
        let mut entries = Vec::with_capacity(n.min(1 << 20) as usize);
        for i in 0..n {
            let e =
                parse_central(&mut c).ok_or_else(|| bad(path, format!("central directory entry {i} is malformed")))?;
            entries.push(e);
        }
        // Each entry's data starts after its local header, whose name and extra lengths may differ
        // from the central ones.
        for e in &mut entries {
            let local_at = e.data_start;
            let h = read_at(file, path, local_at, 30).map_err(|_| {
                bad(path, format!("entry `{}`: its local header at {local_at} is past the end of the file", e.name))
            })?;
            let mut c = Cursor::new(&h, 0);
            if c.u32() != Some(LOCAL) {
                return Err(bad(path, format!("entry `{}`: no local header at offset {local_at}", e.name)));
            }
            let mut c = Cursor::new(&h, 26);
            let (nl, xl) = (c.u16().unwrap_or(0) as u64, c.u16().unwrap_or(0) as u64);
            e.data_start = local_at + 30 + nl + xl;
            if e.data_start.checked_add(e.size).is_none_or(|end| end > file_len) {
                return Err(bad(
                    path,
                    format!(
                        "entry `{}` needs bytes {}..{} but the file has {file_len}: truncated",
                        e.name,
                        e.data_start,
                        e.data_start.saturating_add(e.size)
                    ),
                ));
            }
        }
        Ok(Self { entries, file_len })
    }

    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }
}

/// One central directory record; `data_start` holds the local header offset until resolved.
fn parse_central(c: &mut Cursor) -> Option<Entry> {
    if c.u32()? != CENTRAL {
        return None;
    }
    let _made_by = c.u16()?;
    let _needed = c.u16()?;
    let _flags = c.u16()?;
    let method = c.u16()?;
    let _time = c.u32()?;
    let crc32 = c.u32()?;
    let mut comp = c.u32()? as u64;
    let mut size = c.u32()? as u64;
    let (nl, xl, cl) = (c.u16()? as usize, c.u16()? as usize, c.u16()? as usize);
    let _disk = c.u16()?;
    let _attrs = (c.u16()?, c.u32()?);
    let mut offset = c.u32()? as u64;
    let name = String::from_utf8_lossy(c.take(nl)?).into_owned();
    let extra = c.take(xl)?;
    c.take(cl)?;
    // The zip64 field holds, in this order, only the values that overflowed.
    let mut x = Cursor::new(extra, 0);
    while let (Some(id), Some(len)) = (x.u16(), x.u16()) {
        let body = x.take(len as usize)?;
        if id == ZIP64_EXTRA {
            let mut z = Cursor::new(body, 0);
            if size == MAX32 {
                size = z.u64()?;
            }
            if comp == MAX32 {
                comp = z.u64()?;
            }
            if offset == MAX32 {
                offset = z.u64()?;
            }
        }
    }
    // Stored entries: both sizes are the data size.
    let size = if method == 0 { size.max(comp) } else { comp };
    Some(Entry { name, method, size, crc32, data_start: offset })
}

/// Writes a stored ZIP archive entry by entry. Each entry's size is given when it starts; its
/// CRC is computed while the data streams through and patched into the local header at the end.
pub struct ZipWriter<W: Write + Seek> {
    out: W,
    pos: u64,
    central: Vec<(Entry, u64)>,
    open: Option<Open>,
    force_zip64: bool,
}

struct Open {
    name: String,
    header_at: u64,
    size: u64,
    written: u64,
    crc: crc32fast::Hasher,
}

impl<W: Write + Seek> ZipWriter<W> {
    pub fn new(out: W) -> Self {
        Self { out, pos: 0, central: Vec::new(), open: None, force_zip64: false }
    }

    /// Writes zip64 records for every entry and the end, whatever the sizes (for tests: archives
    /// over 4 GiB take this path anyway).
    pub fn force_zip64(mut self) -> Self {
        self.force_zip64 = true;
        self
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    /// Starts an entry of exactly `size` bytes.
    pub fn start(&mut self, name: &str, size: u64) -> io::Result<()> {
        if self.open.is_some() {
            return Err(io::Error::other(format!("zip: entry `{name}` started before the previous one ended")));
        }
        let zip64 = self.force_zip64 || size >= MAX32;
        let header_at = self.pos;
        let mut h = Vec::with_capacity(30 + name.len() + 96);
        h.extend(LOCAL.to_le_bytes());
        h.extend((if zip64 { 45u16 } else { 20u16 }).to_le_bytes());
        h.extend([0u8; 2]); // flags
        h.extend([0u8; 2]); // stored
        h.extend([0u8, 0, 0x21, 0]); // 1980-01-01 00:00, fixed so outputs are reproducible
        h.extend([0u8; 4]); // crc, patched at the end
        let s32 = if zip64 { MAX32 as u32 } else { size as u32 };
        h.extend(s32.to_le_bytes());
        h.extend(s32.to_le_bytes());
        h.extend((name.len() as u16).to_le_bytes());
        let z64_len = if zip64 { 20 } else { 0 };
        let base = header_at + 30 + name.len() as u64 + z64_len + 4;
        let pad = (ALIGN - base % ALIGN) % ALIGN;
        h.extend(((z64_len + 4 + pad) as u16).to_le_bytes());
        h.extend(name.as_bytes());
        if zip64 {
            h.extend(ZIP64_EXTRA.to_le_bytes());
            h.extend(16u16.to_le_bytes());
            h.extend(size.to_le_bytes());
            h.extend(size.to_le_bytes());
        }
        h.extend(PAD_EXTRA.to_le_bytes());
        h.extend((pad as u16).to_le_bytes());
        h.resize(h.len() + pad as usize, 0);
        self.put(&h)?;
        self.open = Some(Open { name: name.to_string(), header_at, size, written: 0, crc: crc32fast::Hasher::new() });
        Ok(())
    }

    /// Bytes written so far to the open entry.
    pub fn written(&self) -> u64 {
        self.open.as_ref().map_or(0, |o| o.written)
    }

    /// Appends data to the open entry.
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let Some(open) = self.open.as_mut() else {
            return Err(io::Error::other("zip: data written outside an entry"));
        };
        open.written += data.len() as u64;
        if open.written > open.size {
            return Err(io::Error::other(format!(
                "zip: entry `{}` was declared {} bytes but got more",
                open.name, open.size
            )));
        }
        open.crc.update(data);
        self.put(data)
    }

    /// Ends the open entry: its size must be what `start` declared.
    pub fn end(&mut self) -> io::Result<()> {
        let Some(open) = self.open.take() else {
            return Err(io::Error::other("zip: no entry to end"));
        };
        if open.written != open.size {
            return Err(io::Error::other(format!(
                "zip: entry `{}` was declared {} bytes but got {}",
                open.name, open.size, open.written
            )));
        }
        let crc32 = open.crc.finalize();
        self.out.seek(SeekFrom::Start(open.header_at + 14))?;
        self.out.write_all(&crc32.to_le_bytes())?;
        self.out.seek(SeekFrom::Start(self.pos))?;
        let data_start = self.pos - open.size;
        self.central.push((Entry { name: open.name, method: 0, size: open.size, crc32, data_start }, open.header_at));
        Ok(())
    }

    /// One whole entry.
    pub fn entry(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        self.start(name, data.len() as u64)?;
        self.write(data)?;
        self.end()
    }

    /// Writes the central directory and the end records; returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        if let Some(open) = &self.open {
            return Err(io::Error::other(format!("zip: entry `{}` was never ended", open.name)));
        }
        let cd_start = self.pos;
        let central = std::mem::take(&mut self.central);
        for (e, header_at) in &central {
            let big_size = self.force_zip64 || e.size >= MAX32;
            let big_off = self.force_zip64 || *header_at >= MAX32;
            let mut extra = Vec::new();
            if big_size {
                extra.extend(e.size.to_le_bytes());
                extra.extend(e.size.to_le_bytes());
            }
            if big_off {
                extra.extend(header_at.to_le_bytes());
            }
            let mut h = Vec::with_capacity(46 + e.name.len() + 28);
            h.extend(CENTRAL.to_le_bytes());
            let version = if big_size || big_off { 45u16 } else { 20u16 };
            h.extend(version.to_le_bytes());
            h.extend(version.to_le_bytes());
            h.extend([0u8; 4]); // flags, method
            h.extend([0u8, 0, 0x21, 0]);
            h.extend(e.crc32.to_le_bytes());
            let s32 = if big_size { MAX32 as u32 } else { e.size as u32 };
            h.extend(s32.to_le_bytes());
            h.extend(s32.to_le_bytes());
            h.extend((e.name.len() as u16).to_le_bytes());
            h.extend((if extra.is_empty() { 0 } else { extra.len() as u16 + 4 }).to_le_bytes());
            h.extend([0u8; 10]); // comment length, disk, internal and external attributes
            h.extend((if big_off { MAX32 as u32 } else { *header_at as u32 }).to_le_bytes());
            h.extend(e.name.as_bytes());
            if !extra.is_empty() {
                h.extend(ZIP64_EXTRA.to_le_bytes());
                h.extend((extra.len() as u16).to_le_bytes());
                h.extend(extra);
            }
            self.put(&h)?;
        }
        let (n, cd_size) = (central.len() as u64, self.pos - cd_start);
        let zip64 = self.force_zip64 || n >= 0xffff || cd_start >= MAX32 || cd_size >= MAX32;
        let mut t = Vec::with_capacity(98);
        if zip64 {
            let rec_at = self.pos;
            t.extend(EOCD64.to_le_bytes());
            t.extend(44u64.to_le_bytes());
            t.extend(45u16.to_le_bytes());
            t.extend(45u16.to_le_bytes());
            t.extend([0u8; 8]); // disk numbers
            t.extend(n.to_le_bytes());
            t.extend(n.to_le_bytes());
            t.extend(cd_size.to_le_bytes());
            t.extend(cd_start.to_le_bytes());
            t.extend(EOCD64_LOCATOR.to_le_bytes());
            t.extend(0u32.to_le_bytes());
            t.extend(rec_at.to_le_bytes());
            t.extend(1u32.to_le_bytes());
        }
        let n16 = if zip64 { 0xffff } else { n as u16 };
        t.extend(EOCD.to_le_bytes());
        t.extend([0u8; 4]);
        t.extend(n16.to_le_bytes());
        t.extend(n16.to_le_bytes());
        t.extend((if zip64 { MAX32 as u32 } else { cd_size as u32 }).to_le_bytes());
        t.extend((if zip64 { MAX32 as u32 } else { cd_start as u32 }).to_le_bytes());
        t.extend(0u16.to_le_bytes());
        self.put(&t)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(force: bool) {
        let dir = std::env::temp_dir().join(format!("glm-zip-{}-{force}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.zip");
        let f = File::create(&p).unwrap();
        let mut w = ZipWriter::new(std::io::BufWriter::new(f));
        if force {
            w = w.force_zip64();
        }
        w.entry("archive/data.pkl", b"hello").unwrap();
        w.start("archive/data/0", 300).unwrap();
        w.write(&[7u8; 100]).unwrap();
        w.write(&[9u8; 200]).unwrap();
        w.end().unwrap();
        w.entry("archive/version", b"3\n").unwrap();
        w.finish().unwrap();
        let f = File::open(&p).unwrap();
        let idx = ZipIndex::read(&f, &p).unwrap();
        assert_eq!(idx.entries.len(), 3);
        let e = idx.get("archive/data/0").unwrap();
        assert_eq!((e.size, e.data_start % ALIGN), (300, 0));
        let b = read_at(&f, &p, e.data_start, 300).unwrap();
        assert_eq!(crc32fast::hash(&b), e.crc32);
        assert!(b[..100].iter().all(|&x| x == 7) && b[100..].iter().all(|&x| x == 9));
        let e = idx.get("archive/data.pkl").unwrap();
        assert_eq!(read_at(&f, &p, e.data_start, 5).unwrap(), b"hello");
        // Every cut of the file is an error, never a panic.
        let bytes = std::fs::read(&p).unwrap();
        for cut in 0..bytes.len() {
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let f = File::open(&p).unwrap();
            assert!(ZipIndex::read(&f, &p).is_err(), "cut {cut} of {}", bytes.len());
        }
    }

    #[test]
    fn write_read_roundtrip() {
        roundtrip(false);
    }

    #[test]
    fn write_read_roundtrip_zip64() {
        roundtrip(true);
    }

    #[test]
    fn sizes_are_enforced() {
        let mut w = ZipWriter::new(std::io::Cursor::new(Vec::new()));
        w.start("x", 3).unwrap();
        assert!(w.write(&[1, 2, 3, 4]).is_err());
        let mut w = ZipWriter::new(std::io::Cursor::new(Vec::new()));
        w.start("x", 3).unwrap();
        w.write(&[1]).unwrap();
        assert!(w.end().is_err());
    }
}
