//! The frame decoder: any bytes from the network either decode to a frame that encodes back to
//! the same frame, or are refused; never a panic or an allocation past `MAX_FRAME`.
#![no_main]
use ferry::wire::frame::{Decoder, decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = decode(data) {
        let again = encode(&f);
        assert_eq!(decode(&again[4..]).as_ref(), Ok(&f));
    }
    // The same bytes as a stream of length-prefixed frames.
    let mut d = Decoder::default();
    d.push(data);
    while let Ok(Some(_)) = d.next_frame() {}
});
