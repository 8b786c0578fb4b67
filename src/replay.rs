//! Reading a request body so it can be sent again.
//!
//! The guard never clones a whole `Request`: it keeps the head (method, URI,
//! version, headers, extensions) and, for a body small enough to replay, the bytes
//! as one [`Bytes`] shared by every attempt (a reference-count bump, never a copy).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame};

use crate::body::{into_bytes, RequestBody};
use crate::BoxError;

/// How a request's body will be sent, decided when the request arrives.
pub(crate) enum Plan {
    /// Stream it through once: the request cannot be retried.
    Stream,
    /// The body is empty: nothing to read, always replayable.
    Empty,
    /// Read it first (up to the cap), to send it again on a retry.
    Buffer(Mode),
}

impl Plan {
    /// The plan for `body`, when retries are `possible`, with replay `cap`.
    pub(crate) fn for_body<B: Body>(body: &B, possible: bool, cap: usize) -> Plan {
        if !possible {
            return Plan::Stream;
        }
        if body.is_end_stream() {
            return Plan::Empty;
        }
        let hint = body.size_hint();
        let cap64 = u64::try_from(cap).unwrap_or(u64::MAX);
        match hint.exact() {
            Some(n) if n <= cap64 => Plan::Buffer(Mode::Exact(n)),
            Some(_) => Plan::Stream,
            None if hint.lower() > cap64 => Plan::Stream,
            None => Plan::Buffer(Mode::Ready),
        }
    }
}

/// Reading a request body to replay, before the first attempt; `S` is the
/// ready service that will send it.
pub(crate) struct Buffering<S, B> {
    // Taken when the reading is over: a `Buffering` gives its output once.
    pending: Option<(Parts, B, S)>,
    buffer: BodyBuffer,
}

/// How reading a body for replay ended.
pub(crate) enum Buffered<S, B> {
    /// The whole body: sent now, and again on a retry.
    Replayable {
        parts: Parts,
        service: S,
        replay: ReplayBody,
    },
    /// Not replayable after all (longer than declared or than the cap, or of
    /// unknown length and not all there yet): it streams through once, after
    /// what was already read.
    Stream {
        parts: Parts,
        service: S,
        prefix: Bytes,
        body: B,
    },
    /// The caller's body failed.
    Failed { parts: Parts, error: BoxError },
}

impl<S, B> Buffering<S, B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    pub(crate) fn new(parts: Parts, body: B, service: S, mode: Mode, cap: usize) -> Self {
        Buffering {
            pending: Some((parts, body, service)),
            buffer: BodyBuffer::new(mode, cap),
        }
    }

    /// The request head, while the body is being read.
    pub(crate) fn parts(&self) -> Option<&Parts> {
        self.pending.as_ref().map(|(parts, _, _)| parts)
    }

    /// Reads what the body has ready. Once it has given its output it stays
    /// pending, like any future polled after completion.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Buffered<S, B>> {
        let Some((_, body, _)) = self.pending.as_mut() else {
            return Poll::Pending;
        };
        let end = loop {
            match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match self.buffer.feed(frame) {
                    Fed::More if body.is_end_stream() => break End::Complete,
                    Fed::More => continue,
                    Fed::Overflow => break End::Stream,
                },
                Poll::Ready(Some(Err(error))) => break End::Failed(error.into()),
                Poll::Ready(None) => break End::Complete,
                Poll::Pending if self.buffer.ready_only() => break End::Stream,
                Poll::Pending => return Poll::Pending,
            }
        };
        let Some((parts, body, service)) = self.pending.take() else {
            return Poll::Pending;
        };
        let buffer = std::mem::replace(&mut self.buffer, BodyBuffer::new(Mode::Ready, 0));
        Poll::Ready(match end {
            End::Complete => Buffered::Replayable {
                parts,
                service,
                replay: buffer.finish(),
            },
            End::Stream => Buffered::Stream {
                parts,
                service,
                prefix: buffer.into_prefix(),
                body,
            },
            End::Failed(error) => Buffered::Failed { parts, error },
        })
    }
}

/// Why the reading loop ended.
enum End {
    Complete,
    Stream,
    Failed(BoxError),
}

/// A buffered request body, sent again on each attempt.
#[derive(Clone, Debug, Default)]
pub(crate) struct ReplayBody {
    data: Bytes,
    // Boxed: request trailers are rare, and an inline map would make every
    // request's future bigger.
    trailers: Option<Box<HeaderMap>>,
}

impl ReplayBody {
    pub(crate) fn body<B>(&self) -> RequestBody<B> {
        RequestBody::replay(self.data.clone(), self.trailers.as_deref().cloned())
    }
}

/// How the buffer treats a body that is not yet complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The body declared an exact length within the cap: wait for all of it.
    Exact(u64),
    /// The body's length is unknown: take only what is ready now; the moment it
    /// would make us wait, give up and stream it (it may be a real stream whose
    /// next bytes depend on the response).
    Ready,
}

/// What feeding a frame to the buffer decided.
pub(crate) enum Fed {
    /// Keep reading.
    More,
    /// The body broke its declared length, or outgrew the cap: stream it.
    Overflow,
}

/// Accumulates a request body for replay, bounded by the replay cap.
///
/// Small on purpose: it shares the response future's room with the attempt's
/// future, so every byte here is a byte of every request's future.
#[derive(Debug)]
pub(crate) struct BodyBuffer {
    /// The most bytes it takes: the declared length, or the cap if less or if
    /// the length is unknown (capped at `u32::MAX`; the replay cap is 16 MiB).
    limit: u32,
    /// Whether the length is unknown ([`Mode::Ready`]).
    ready_only: bool,
    data: Data,
    /// Boxed: request trailers are rare.
    trailers: Option<Box<HeaderMap>>,
}

/// The bytes read so far.
#[derive(Debug)]
enum Data {
    Empty,
    /// The common case, one chunk holding the whole body, kept as it is: no
    /// copy at all.
    One(Bytes),
    /// Several chunks, joined.
    Joined(BytesMut),
}

impl Data {
    fn len(&self) -> usize {
        match self {
            Data::Empty => 0,
            Data::One(bytes) => bytes.len(),
            Data::Joined(joined) => joined.len(),
        }
    }
}

impl BodyBuffer {
    pub(crate) fn new(mode: Mode, cap: usize) -> BodyBuffer {
        let (limit, ready_only) = match mode {
            Mode::Exact(n) => (usize::try_from(n).unwrap_or(usize::MAX).min(cap), false),
            Mode::Ready => (cap, true),
        };
        BodyBuffer {
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
            ready_only,
            data: Data::Empty,
            trailers: None,
        }
    }

    /// Whether it takes only what the body has ready (its length is unknown).
    pub(crate) fn ready_only(&self) -> bool {
        self.ready_only
    }

    /// Adds one frame of the body.
    pub(crate) fn feed<D: bytes::Buf>(&mut self, frame: Frame<D>) -> Fed {
        let frame = frame.map_data(into_bytes);
        match frame.into_data() {
            Ok(data) => {
                // Keep the data even on overflow: it becomes the streamed prefix.
                self.push(data);
                if self.data.len() > self.limit as usize {
                    Fed::Overflow
                } else {
                    Fed::More
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    match &mut self.trailers {
                        Some(existing) => existing.extend(trailers),
                        None => self.trailers = Some(Box::new(trailers)),
                    }
                }
                Fed::More
            }
        }
    }

    fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        self.data = match std::mem::replace(&mut self.data, Data::Empty) {
            Data::Empty => Data::One(data),
            Data::One(first) => {
                // A known length is reserved at once; an unknown one grows.
                let room = if self.ready_only {
                    first.len() + data.len()
                } else {
                    self.limit as usize
                };
                let mut joined = BytesMut::with_capacity(room.max(first.len() + data.len()));
                joined.extend_from_slice(&first);
                joined.extend_from_slice(&data);
                Data::Joined(joined)
            }
            Data::Joined(mut joined) => {
                joined.extend_from_slice(&data);
                Data::Joined(joined)
            }
        };
    }

    /// Everything read so far, as one buffer.
    fn bytes(&mut self) -> Bytes {
        match std::mem::replace(&mut self.data, Data::Empty) {
            Data::Empty => Bytes::new(),
            Data::One(bytes) => bytes,
            Data::Joined(joined) => joined.freeze(),
        }
    }

    /// The complete body, for replay.
    pub(crate) fn finish(mut self) -> ReplayBody {
        ReplayBody {
            data: self.bytes(),
            trailers: self.trailers.take(),
        }
    }

    /// What was read before giving up, to be sent ahead of the rest of the body.
    /// Trailers cannot have been read yet (they end a body), so nothing is lost.
    pub(crate) fn into_prefix(mut self) -> Bytes {
        self.bytes()
    }
}

/// Whether a header value is a usable request id to echo: printable ASCII and at
/// most 128 bytes. Anything else is left out of error bodies rather than trimmed.
pub(crate) fn usable_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| (0x20..0x7f).contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(s: &'static [u8]) -> Frame<Bytes> {
        Frame::data(Bytes::from_static(s))
    }

    #[test]
    fn a_single_chunk_is_kept_without_copying() {
        let chunk = Bytes::from(vec![7u8; 1000]);
        let ptr = chunk.as_ptr();
        let mut buf = BodyBuffer::new(Mode::Exact(1000), 64 * 1024);
        assert!(matches!(buf.feed(Frame::data(chunk)), Fed::More));
        let replay = buf.finish();
        assert_eq!(replay.data.as_ptr(), ptr);
    }

    #[test]
    fn chunks_are_joined_in_order() {
        let mut buf = BodyBuffer::new(Mode::Exact(11), 64);
        buf.feed(data(b"hello"));
        buf.feed(data(b" "));
        buf.feed(data(b"world"));
        assert_eq!(buf.finish().data, "hello world");
    }

    #[test]
    fn a_body_longer_than_declared_overflows_and_keeps_every_byte() {
        let mut buf = BodyBuffer::new(Mode::Exact(4), 64);
        assert!(matches!(buf.feed(data(b"abc")), Fed::More));
        assert!(matches!(buf.feed(data(b"defg")), Fed::Overflow));
        assert_eq!(buf.into_prefix(), "abcdefg");
    }

    #[test]
    fn unknown_length_overflows_past_the_cap() {
        let mut buf = BodyBuffer::new(Mode::Ready, 4);
        assert!(matches!(buf.feed(data(b"abcd")), Fed::More));
        assert!(matches!(buf.feed(data(b"e")), Fed::Overflow));
        assert_eq!(buf.into_prefix(), "abcde");
    }

    #[test]
    fn trailers_are_kept_for_replay() {
        let mut buf = BodyBuffer::new(Mode::Ready, 64);
        buf.feed(data(b"x"));
        let mut t = HeaderMap::new();
        t.insert("x-sum", "1".parse().unwrap());
        buf.feed(Frame::<Bytes>::trailers(t));
        let replay = buf.finish();
        assert_eq!(replay.trailers.unwrap()["x-sum"], "1");
    }

    #[test]
    fn request_ids_must_be_short_printable_ascii() {
        assert!(usable_request_id(&HeaderValue::from_static("abc-123")));
        assert!(!usable_request_id(&HeaderValue::from_static("")));
        assert!(!usable_request_id(
            &HeaderValue::from_bytes(&[b'a'; 129]).unwrap()
        ));
        assert!(!usable_request_id(
            &HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap()
        ));
    }
}
