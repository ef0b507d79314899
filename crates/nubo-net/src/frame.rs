//! Frames on a QUIC stream: a 4-byte big-endian length, then one encoded message.

use bytes::{BufMut, Bytes, BytesMut};
use nubo_proto::Message;
use nubo_proto::wire::{self, EncodeError, MESSAGE_BYTES_MAX};

/// Bytes of a frame's length prefix.
pub const HEADER_BYTES: usize = 4;

/// `message` as one frame.
pub fn encode(message: &Message) -> Result<Bytes, EncodeError> {
    let body = wire::encode(message)?;
    let mut frame = BytesMut::with_capacity(HEADER_BYTES + body.len());
    frame.put_u32(body.len() as u32);
    frame.put_slice(&body);
    Ok(frame.freeze())
}

/// The body length a frame header announces, if it is acceptable: at least one byte and at
/// most [`MESSAGE_BYTES_MAX`]. A reader refuses the stream otherwise, before allocating.
pub fn body_len(header: [u8; HEADER_BYTES]) -> Option<usize> {
    let len = u32::from_be_bytes(header) as usize;
    (1..=MESSAGE_BYTES_MAX).contains(&len).then_some(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nubo_proto::membership::MembershipMessage;

    #[test]
    fn a_frame_is_its_length_then_the_message() {
        let message = Message::Membership(MembershipMessage::Ping);
        let frame = encode(&message).unwrap();
        let header: [u8; 4] = frame[..4].try_into().unwrap();
        assert_eq!(body_len(header), Some(frame.len() - 4));
        assert_eq!(wire::decode(&frame[4..]).unwrap(), message);
    }

    #[test]
    fn empty_and_oversized_lengths_are_refused() {
        assert_eq!(body_len([0, 0, 0, 0]), None);
        assert_eq!(body_len((MESSAGE_BYTES_MAX as u32 + 1).to_be_bytes()), None);
        assert_eq!(body_len([0xff; 4]), None);
        assert_eq!(
            body_len((MESSAGE_BYTES_MAX as u32).to_be_bytes()),
            Some(MESSAGE_BYTES_MAX)
        );
    }
}
