//! Feeds arbitrary bytes to the frame decoder: it must return messages or an error, never
//! panic, abort or allocate without bound. Every decoded message must re-encode and decode to
//! itself.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tandem_protocol::MessageCodec;
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    let mut codec = MessageCodec::new(1 << 20);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(item)) = codec.decode(&mut buf) {
        let Ok(msg) = item else { continue };
        let mut again = BytesMut::new();
        codec.encode(&msg, &mut again).expect("a decoded message re-encodes");
        let back = codec.decode(&mut again).expect("re-decodes").expect("whole frame");
        assert_eq!(back.expect("a valid frame"), msg);
    }
});
