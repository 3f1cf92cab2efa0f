//! The thread-per-core rules as compile-time assertions: per-core state is `!Send`
//! (it cannot leave its thread by mistake), every cross-core message is `Send`.

/// Fails to compile when `$t` is `Send`. Two blanket impls of one trait make the
/// item name ambiguous exactly when the `Send` one applies.
macro_rules! assert_not_send {
    ($t:ty) => {
        const _: fn() = || {
            trait AmbiguousIfSend<A> {
                fn item() {}
            }
            impl<T: ?Sized> AmbiguousIfSend<()> for T {}
            impl<T: ?Sized + Send> AmbiguousIfSend<u8> for T {}
            let _ = <$t as AmbiguousIfSend<_>>::item;
        };
    };
}

/// Fails to compile when `$t` is not `Send`.
macro_rules! assert_send {
    ($t:ty) => {
        const _: fn() = || {
            fn is_send<T: Send>() {}
            is_send::<$t>();
        };
    };
}

pub(crate) use {assert_not_send, assert_send};

use super::addr::{AddrMesh, AddrMsg, Claim, Slot};
use super::mesh::{CoreMsg, Handover, Mesh};
use super::outbox::Outbox;
use super::registry::Registry;
use super::ws::handshake::Upgrade;

assert_not_send!(Registry);
assert_not_send!(Outbox);
assert_not_send!(Slot);
assert_send!(Claim);
assert_send!(AddrMsg);
assert_send!(AddrMesh);
assert_send!(Upgrade);
assert_send!(Handover);
assert_send!(CoreMsg<()>);
assert_send!(Mesh<()>);
