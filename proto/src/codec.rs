//! The protobuf codec of every Flotilla service: tonic-prost's `ProstCodec`, except that a
//! message that cannot be decoded is `INVALID_ARGUMENT` (the caller sent bytes that are not the
//! message the method takes), not `INTERNAL` (which tells a client the server is broken and
//! invites a retry of the same bytes).
//!
//! Hand-written, not generated: `build.rs` points tonic-prost-build at it with `codec_path`.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Longest decoder error text put in a status message, in bytes.
const MAX_DECODE_ERROR_BYTES: usize = 256;

/// A [`Codec`] encoding `T` and decoding `U` with prost; see the module docs.
#[derive(Debug, Clone)]
pub struct FlotillaCodec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> Default for FlotillaCodec<T, U> {
    fn default() -> Self {
        FlotillaCodec {
            inner: ProstCodec::default(),
        }
    }
}

impl<T, U> Codec for FlotillaCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = FlotillaDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        FlotillaDecoder {
            inner: self.inner.decoder(),
            _message: PhantomData,
        }
    }
}

/// Decodes `U`; an undecodable message is `INVALID_ARGUMENT` naming the message type.
#[derive(Debug, Clone)]
pub struct FlotillaDecoder<U> {
    inner: ProstDecoder<U>,
    _message: PhantomData<U>,
}

impl<U: Message + Default> Decoder for FlotillaDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner.decode(buf).map_err(|status| {
            let mut detail = status.message().to_string();
            if detail.len() > MAX_DECODE_ERROR_BYTES {
                let mut end = MAX_DECODE_ERROR_BYTES;
                while !detail.is_char_boundary(end) {
                    end -= 1;
                }
                detail.truncate(end);
            }
            let type_name = std::any::type_name::<U>();
            let name = type_name.rsplit("::").next().unwrap_or(type_name);
            Status::invalid_argument(format!(
                "the message is not a valid {name} (protobuf decoding failed: {detail})"
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}
