//! Minimal HL7 v2 over MLLP: framing, reading a frame, reading and making ACKs.
//!
//! A frame is `0x0B <message> 0x1C 0x0D`; segments inside a message are separated by `\r`.
//! Used by the `mllp` health check, by the MLLP relay (`balancer-mllp`, through
//! [`read_frame_bounded`] and [`header`]) and by the controller's tests and demo peers.
//! Messages carry patient data: nothing here logs or formats message content, and the
//! errors returned name the framing problem only.

use std::{
    io,
    sync::atomic::{AtomicU32, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

/// Start-of-block byte (VT) opening every frame.
pub const START: u8 = 0x0B;
/// End-of-block byte (FS), followed by [`CR`], closing every frame.
pub const END: u8 = 0x1C;
/// Carriage return: closes a frame after [`END`] and separates segments.
pub const CR: u8 = 0x0D;

/// Wraps `msg` in an MLLP frame: `0x0B msg 0x1C 0x0D`.
pub fn frame(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + 3);
    out.push(START);
    out.extend_from_slice(msg);
    out.extend_from_slice(&[END, CR]);
    out
}

/// Reads one MLLP frame and returns the message inside it, without the framing bytes.
///
/// The reader must be buffered (wrap a `TcpStream` in [`tokio::io::BufReader`]); nothing
/// past the frame's closing `0x1C 0x0D` is consumed, so frames can be read one after the
/// other from one connection. Errors: [`io::ErrorKind::InvalidData`] when the first byte is
/// not `0x0B`, when `0x1C` is not followed by `0x0D`, or when the message exceeds `max_len`
/// bytes; [`io::ErrorKind::UnexpectedEof`] when the peer closes before the frame ends.
/// Error messages never contain message bytes.
pub async fn read_frame<R>(reader: &mut R, max_len: usize) -> io::Result<Vec<u8>>
where
    R: AsyncBufRead + Unpin + ?Sized,
{
    let first = reader.read_u8().await?;
    if first != START {
        return Err(invalid("bad MLLP framing: no start byte"));
    }
    let mut out = Vec::new();
    loop {
        let (used, done) = {
            let buf = reader.fill_buf().await?;
            if buf.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside an MLLP frame",
                ));
            }
            match buf.iter().position(|&b| b == END) {
                Some(pos) => {
                    out.extend_from_slice(&buf[..pos]);
                    (pos + 1, true)
                }
                None => {
                    out.extend_from_slice(buf);
                    (buf.len(), false)
                }
            }
        };
        reader.consume(used);
        if out.len() > max_len {
            return Err(invalid_owned(format!("MLLP frame over {max_len} bytes")));
        }
        if done {
            break;
        }
    }
    if reader.read_u8().await? != CR {
        return Err(invalid("bad MLLP framing: no CR after end byte"));
    }
    Ok(out)
}

/// Limits on one frame read by [`read_frame_bounded`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest message (between the framing bytes), in bytes.
    pub max_message: usize,
    /// Most whitespace bytes (CR, LF, space, tab) tolerated before a start block; any other
    /// byte before it is an error.
    pub max_before_start: usize,
}

/// Why a frame could not be read. The texts name the problem only, never a message byte.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A byte other than whitespace came before the start block.
    #[error("no MLLP start block (0x0B): the peer sent another byte first")]
    NoStart,
    /// More whitespace than allowed before the start block.
    #[error("over {0} bytes before an MLLP start block")]
    TooMuchBeforeStart(usize),
    /// The message is over the size limit.
    #[error("MLLP message over {0} bytes")]
    TooLarge(usize),
    /// `0x1C` was not followed by `0x0D`.
    #[error("bad MLLP framing: no CR after the end block")]
    NoCrAfterEnd,
    /// The peer closed the connection inside a frame.
    #[error("connection closed inside an MLLP frame after {0} bytes")]
    Truncated(usize),
    /// A read failed.
    #[error("read failed: {0}")]
    Io(#[from] io::Error),
}

/// Reads one MLLP frame like [`read_frame`], within `limits`, tolerating whitespace before
/// the start block (senders that end frames with `\r\n`). `Ok(None)`: the peer closed the
/// connection cleanly between frames. Nothing past the frame is consumed.
pub async fn read_frame_bounded<R>(
    reader: &mut R,
    limits: &FrameLimits,
) -> Result<Option<Vec<u8>>, FrameError>
where
    R: AsyncBufRead + Unpin + ?Sized,
{
    let mut skipped = 0usize;
    loop {
        let buf = reader.fill_buf().await?;
        let Some(&b) = buf.first() else {
            return Ok(None);
        };
        let ws = buf
            .iter()
            .take_while(|&&b| matches!(b, b'\r' | b'\n' | b' ' | b'\t'))
            .count();
        if ws == 0 {
            if b != START {
                return Err(FrameError::NoStart);
            }
            reader.consume(1);
            break;
        }
        skipped += ws;
        reader.consume(ws);
        if skipped > limits.max_before_start {
            return Err(FrameError::TooMuchBeforeStart(limits.max_before_start));
        }
    }
    let mut out = Vec::new();
    loop {
        let (used, done) = {
            let buf = reader.fill_buf().await?;
            if buf.is_empty() {
                return Err(FrameError::Truncated(out.len()));
            }
            let (part, done) = match buf.iter().position(|&b| b == END) {
                Some(pos) => (&buf[..pos], true),
                None => (buf, false),
            };
            // Checked before copying: a huge frame never grows the buffer past the limit.
            if out.len() + part.len() > limits.max_message {
                return Err(FrameError::TooLarge(limits.max_message));
            }
            out.extend_from_slice(part);
            (part.len() + usize::from(done), done)
        };
        reader.consume(used);
        if done {
            break;
        }
    }
    let mut cr = [0u8; 1];
    match reader.read(&mut cr).await? {
        0 => Err(FrameError::Truncated(out.len())),
        _ if cr[0] != CR => Err(FrameError::NoCrAfterEnd),
        _ => Ok(Some(out)),
    }
}

/// What may be logged about a message: its control ID (MSH-10) and type (MSH-9).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Header {
    /// MSH-10, at most 20 characters of `[A-Za-z0-9._-]` (other characters become `?`).
    pub control_id: String,
    /// MSH-9, e.g. `ADT^A01`, at most 15 characters, same alphabet plus `^`.
    pub message_type: String,
}

/// The control ID and type of a message, cleaned for a log line (a malformed MSH gives
/// empty fields, never other bytes of the message).
pub fn header(msg: &[u8]) -> Header {
    let sep = field_separator(msg);
    let Some(msh) = segments(msg).next().filter(|s| s.starts_with(b"MSH")) else {
        return Header::default();
    };
    let fields: Vec<&[u8]> = msh.split(|&b| b == sep).collect();
    // MSH-1 is the separator itself, so MSH-n is fields[n - 1].
    let clean = |f: Option<&&[u8]>, max: usize, extra: u8| -> String {
        f.map(|f| {
            f.iter()
                .take(max)
                .map(|&b| {
                    if b.is_ascii_alphanumeric() || b"._-".contains(&b) || b == extra {
                        b as char
                    } else {
                        '?'
                    }
                })
                .collect()
        })
        .unwrap_or_default()
    };
    let component = fields
        .get(1)
        .and_then(|e| e.first())
        .copied()
        .unwrap_or(b'^');
    Header {
        control_id: clean(fields.get(9), 20, b'-'),
        message_type: clean(fields.get(8), 15, component).replace(component as char, "^"),
    }
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn invalid_owned(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Splits a message into segments (`\r`; a stray `\n` is tolerated).
fn segments(msg: &[u8]) -> impl Iterator<Item = &[u8]> {
    msg.split(|&b| b == b'\r' || b == b'\n')
        .filter(|s| !s.is_empty())
}

/// The field separator declared by the message's MSH segment (MSH-1), `|` if there is none.
fn field_separator(msg: &[u8]) -> u8 {
    match segments(msg).next() {
        Some(msh) if msh.starts_with(b"MSH") && msh.len() > 3 => msh[3],
        _ => b'|',
    }
}

/// The acknowledgment code (MSA-1: `AA`, `AE`, `AR`, `CA`, `CE`, `CR`) of an ACK message,
/// or `None` when the message has no MSA segment or an empty MSA-1.
pub fn ack_code(msg: &[u8]) -> Option<String> {
    let sep = field_separator(msg);
    let msa = segments(msg).find(|s| s.starts_with(b"MSA") && s.get(3) == Some(&sep))?;
    let code = msa[4..].split(|&b| b == sep).next()?;
    let code = std::str::from_utf8(code).ok()?.trim();
    (!code.is_empty()).then(|| code.to_string())
}

/// Builds an ACK (unframed) for `msg` with MSA-1 = `code`: sender and receiver of the MSH
/// swapped, `ACK^<trigger of msg>`, MSA-2 = the control ID (MSH-10) of `msg`.
pub fn make_ack(msg: &[u8], code: &str) -> Vec<u8> {
    let sep = field_separator(msg) as char;
    let msh = segments(msg).find(|s| s.starts_with(b"MSH")).unwrap_or(b"");
    let msh = String::from_utf8_lossy(msh);
    let parts: Vec<&str> = msh.split(sep).collect();
    // MSH-1 is the separator itself, so MSH-n is parts[n - 1] for n >= 2.
    let field = |n: usize| parts.get(n - 1).copied().unwrap_or("");
    let encoding = match field(2) {
        "" => "^~\\&",
        e => e,
    };
    let component = encoding.chars().next().unwrap_or('^');
    let trigger = field(9).split(component).nth(1).unwrap_or("");
    let processing = match field(11) {
        "" => "P",
        p => p,
    };
    let version = match field(12) {
        "" => "2.3",
        v => v,
    };
    let s = sep;
    format!(
        "MSH{s}{encoding}{s}{}{s}{}{s}{}{s}{}{s}{}{s}{s}ACK{component}{trigger}{s}{}{s}{processing}{s}{version}\rMSA{s}{code}{s}{}",
        field(5),
        field(6),
        field(3),
        field(4),
        timestamp(SystemTime::now()),
        control_id(),
        field(10),
    )
    .into_bytes()
}

/// The default health-check message: one MSH segment, no other segment and no patient
/// data, of type `NMQ^N01` (HL7's application management query, meant for "are you
/// there"), version 2.3, with a fresh control ID (MSH-10) and the current UTC time:
///
/// `MSH|^~\&|BALANCER|HEALTHCHECK|||20260101120000||NMQ^N01|BH202601011200000001|P|2.3`
///
/// A listener that does not accept `NMQ` can be checked with its own harmless message
/// through the `message` key of the health spec.
pub fn ping() -> String {
    format!(
        "MSH|^~\\&|BALANCER|HEALTHCHECK|||{}||NMQ^N01|{}|P|2.3",
        timestamp(SystemTime::now()),
        control_id()
    )
}

/// A control ID of at most 20 characters (the ST limit of MSH-10): `BH`, the UTC time to
/// the second, and a 4-digit per-process sequence number.
fn control_id() -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed) % 10_000;
    format!("BH{}{n:04}", timestamp(SystemTime::now()))
}

/// `YYYYMMDDHHMMSS` in UTC.
fn timestamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::BufReader;

    #[test]
    fn frame_wraps() {
        assert_eq!(frame(b"MSH|x"), b"\x0bMSH|x\x1c\x0d");
    }

    #[tokio::test]
    async fn read_frame_reads_consecutive_frames() {
        let mut wire = frame(b"MSH|^~\\&|A\rMSA|AA|1");
        wire.extend(frame(b"MSH|^~\\&|B"));
        let mut r = BufReader::with_capacity(4, &wire[..]);
        assert_eq!(
            read_frame(&mut r, 100).await.unwrap(),
            b"MSH|^~\\&|A\rMSA|AA|1"
        );
        assert_eq!(read_frame(&mut r, 100).await.unwrap(), b"MSH|^~\\&|B");
        let e = read_frame(&mut r, 100).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn read_frame_rejects_bad_frames() {
        for (wire, kind) in [
            (&b"HTTP/1.1 200 OK\r\n"[..], io::ErrorKind::InvalidData),
            (b"\x0bMSH|x\x1cX", io::ErrorKind::InvalidData),
            (b"\x0bMSH|x", io::ErrorKind::UnexpectedEof),
            (b"\x0bMSH|0123456789\x1c\x0d", io::ErrorKind::InvalidData),
        ] {
            let mut r = BufReader::new(wire);
            let e = read_frame(&mut r, 8).await.unwrap_err();
            assert_eq!(e.kind(), kind);
            assert!(!e.to_string().contains("MSH"), "error leaks content: {e}");
        }
    }

    const LIMITS: FrameLimits = FrameLimits {
        max_message: 16,
        max_before_start: 4,
    };

    /// The message read, or the start of the error's text.
    type Want = Result<Option<&'static [u8]>, &'static str>;

    #[tokio::test]
    async fn bounded_frames() {
        let rows: [(&[u8], Want); 10] = [
            (b"\x0bMSH|a\x1c\x0d", Ok(Some(b"MSH|a"))),
            (b"\r\n\x0bMSH|a\x1c\x0d", Ok(Some(b"MSH|a"))),
            (b"", Ok(None)),
            (b"\r\n", Ok(None)),
            (b"MSH|a\x1c\x0d", Err("no MLLP start block")),
            (b"\r\n\r\n\r\x0bMSH\x1c\x0d", Err("over 4 bytes before")),
            (
                b"\x0bMSH|0123456789abcdef\x1c\x0d",
                Err("MLLP message over 16"),
            ),
            (b"\x0bMSH|a\x1cX", Err("bad MLLP framing")),
            (b"\x0bMSH|a", Err("connection closed inside")),
            (b"\x0bMSH|a\x1c", Err("connection closed inside")),
        ];
        for (wire, want) in rows {
            let mut r = BufReader::with_capacity(3, wire);
            let got = read_frame_bounded(&mut r, &LIMITS).await;
            match (got, want) {
                (Ok(m), Ok(w)) => assert_eq!(m.as_deref(), w, "{wire:?}"),
                (Err(e), Err(w)) => {
                    let t = e.to_string();
                    assert!(t.starts_with(w), "{wire:?}: {t}");
                    assert!(!t.contains("MSH"), "error leaks content: {t}");
                }
                (g, w) => panic!("{wire:?}: got {g:?}, want {w:?}"),
            }
        }
    }

    #[tokio::test]
    async fn bounded_frames_leave_the_next_frame() {
        let mut wire = frame(b"MSH|1");
        wire.extend(b"\r\n");
        wire.extend(frame(b"MSH|2"));
        let mut r = BufReader::new(&wire[..]);
        let a = read_frame_bounded(&mut r, &LIMITS).await.unwrap();
        let b = read_frame_bounded(&mut r, &LIMITS).await.unwrap();
        assert_eq!(
            (a.as_deref(), b.as_deref()),
            (Some(&b"MSH|1"[..]), Some(&b"MSH|2"[..]))
        );
        assert!(read_frame_bounded(&mut r, &LIMITS).await.unwrap().is_none());
    }

    #[test]
    fn header_reads_control_id_and_type_only() {
        let h = header(b"MSH|^~\\&|S|F|R|RF|20260101||ADT^A01|CTRL-42|P|2.5\rPID|1||X||DOE^JANE");
        assert_eq!(h.control_id, "CTRL-42");
        assert_eq!(h.message_type, "ADT^A01");
        let h = header(b"MSH|^~\\&|S|F|R|RF|t||ADT^A01|DOE JANE\"<x>|P");
        assert_eq!(h.control_id, "DOE?JANE??x?");
        assert_eq!(header(b"PID|1||X||DOE^JANE"), Header::default());
        assert_eq!(header(b"MSH|^~\\&|S").control_id, "");
        let long = format!("MSH|^~\\&|S|F|R|RF|t||ADT^A01|{}|P", "9".repeat(40));
        assert_eq!(header(long.as_bytes()).control_id.len(), 20);
    }

    #[test]
    fn ack_code_reads_msa1() {
        assert_eq!(
            ack_code(b"MSH|^~\\&|L|F|||20260101||ACK|9|P|2.3\rMSA|AA|123").as_deref(),
            Some("AA")
        );
        assert_eq!(ack_code(b"MSH#^~\\&#L\rMSA#CE#1").as_deref(), Some("CE"));
        assert_eq!(ack_code(b"MSH|^~\\&|L\nMSA|AR").as_deref(), Some("AR"));
        assert_eq!(ack_code(b"MSH|^~\\&|L\rMSA||1"), None);
        assert_eq!(ack_code(b"MSH|^~\\&|L\rMSAX|AA"), None);
        assert_eq!(ack_code(b"garbage"), None);
        assert_eq!(ack_code(b""), None);
    }

    #[test]
    fn make_ack_answers_the_message() {
        let msg = b"MSH|^~\\&|SND|SFAC|RCV|RFAC|20260101||ADT^A01|CTRL42|P|2.5\rEVN|A01";
        let ack = make_ack(msg, "AE");
        assert_eq!(ack_code(&ack).as_deref(), Some("AE"));
        let text = String::from_utf8(ack).unwrap();
        assert!(text.starts_with("MSH|^~\\&|RCV|RFAC|SND|SFAC|"), "{text}");
        assert!(text.contains("|ACK^A01|"), "{text}");
        assert!(text.contains("|P|2.5\r"), "{text}");
        assert!(text.ends_with("\rMSA|AE|CTRL42"), "{text}");
        // Without an MSH it still produces a well-formed ACK.
        assert_eq!(ack_code(&make_ack(b"junk", "AR")).as_deref(), Some("AR"));
    }

    #[test]
    fn ping_has_only_an_msh_segment() {
        let p = ping();
        assert!(p.starts_with("MSH|^~\\&|BALANCER|HEALTHCHECK|"), "{p}");
        assert_eq!(segments(p.as_bytes()).count(), 1, "{p}");
        assert!(!p.contains("PID"), "{p}");
        assert!(!p.contains('\r') && !p.contains('\n'));
        let fields: Vec<&str> = p.split('|').collect();
        assert_eq!(fields[8], "NMQ^N01");
        assert!(fields[9].len() <= 20 && fields[9].starts_with("BH"), "{p}");
        assert_ne!(ping(), p, "control IDs repeat");
    }

    #[test]
    fn timestamps() {
        let t = |s| timestamp(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(t(0), "19700101000000");
        assert_eq!(t(951_782_400), "20000229000000");
        assert_eq!(t(1_798_761_599), "20261231235959");
    }
}
