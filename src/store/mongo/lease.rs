//! Users' leases: which node may write a user's sessions, and the fence every such
//! write runs in its transaction (docs/CLUSTER.md, ownership).
//!
//! One document per user, `{_id: user, node, epoch, expires_at, writes}`. A node
//! takes a lease when it is free, expired or its own; a grant to another node
//! increments the epoch. Each fenced job updates the document it checks, so a
//! lease taken by another node and a job of the old holder touch one document and
//! MongoDB's transactions let only one of them commit.

use mongodb::bson::{doc, Document};
use mongodb::ClientSession;

use super::Colls;
use crate::store::{Millis, Op, StoreError, WriteOp, WriteOutcome};

/// Applies `op` when it is a lease op (`None` otherwise).
pub(super) async fn apply(
    c: &Colls,
    s: &mut ClientSession,
    op: &WriteOp,
) -> Option<Result<WriteOutcome, StoreError>> {
    let done = match op {
        WriteOp::TakeLease {
            user_id,
            node,
            now,
            until,
        } => take(c, s, user_id, node, *now, *until).await,
        WriteOp::Fence {
            user_id,
            node,
            epoch,
        } => fence(c, s, user_id, node, *epoch).await,
        WriteOp::RenewLeases { node, until } => {
            let update = doc! {"$set": {"expires_at": *until}};
            let done = c.leases.update_many(doc! {"node": node}, update);
            done.session(&mut *s)
                .await
                .map(|_| WriteOutcome::Done)
                .map_err(mongo)
        }
        WriteOp::ReleaseLeases { node, users } => {
            let mut filter = doc! {"node": node};
            if let Some(users) = users {
                filter.insert("_id", doc! {"$in": users});
            }
            let update = doc! {"$set": {"expires_at": 0i64}};
            let done = c.leases.update_many(filter, update);
            done.session(&mut *s)
                .await
                .map(|_| WriteOutcome::Done)
                .map_err(mongo)
        }
        _ => return None,
    };
    Some(done)
}

fn mongo(e: mongodb::error::Error) -> StoreError {
    StoreError::mongo(Op::Lease)(e)
}

async fn take(
    c: &Colls,
    s: &mut ClientSession,
    user: &str,
    node: &str,
    now: Millis,
    until: Millis,
) -> Result<WriteOutcome, StoreError> {
    let found: Option<Document> = c
        .leases
        .find_one(doc! {"_id": user})
        .session(&mut *s)
        .await
        .map_err(mongo)?;
    let Some(found) = found else {
        let lease =
            doc! {"_id": user, "node": node, "epoch": 1i64, "expires_at": until, "writes": 0i64};
        c.leases
            .insert_one(lease)
            .session(&mut *s)
            .await
            .map_err(mongo)?;
        return Ok(WriteOutcome::Leased { epoch: 1 });
    };
    let holder = found.get_str("node").unwrap_or_default();
    let epoch = found.get_i64("epoch").unwrap_or_default();
    let expires_at = found.get_i64("expires_at").unwrap_or_default();
    let held = |retry_after_ms: i64| StoreError::LeaseHeld {
        user: user.to_owned(),
        node: holder.to_owned(),
        retry_after_ms: u64::try_from(retry_after_ms).unwrap_or(0).max(1),
    };
    if holder != node && expires_at > now {
        return Err(held(expires_at - now));
    }
    let next = if holder == node { epoch } else { epoch + 1 };
    let taken = c
        .leases
        .update_one(
            doc! {"_id": user, "node": holder, "epoch": epoch},
            doc! {"$set": {"node": node, "epoch": next, "expires_at": until}},
        )
        .session(&mut *s)
        .await
        .map_err(mongo)?;
    if taken.matched_count == 0 {
        // Another node took it between the read and the update.
        return Err(held(1));
    }
    Ok(WriteOutcome::Leased {
        epoch: u64::try_from(next).unwrap_or(0),
    })
}

async fn fence(
    c: &Colls,
    s: &mut ClientSession,
    user: &str,
    node: &str,
    epoch: u64,
) -> Result<WriteOutcome, StoreError> {
    let held = c
        .leases
        .update_one(
            doc! {"_id": user, "node": node, "epoch": super::i64_of(epoch)},
            doc! {"$inc": {"writes": 1i64}},
        )
        .session(&mut *s)
        .await
        .map_err(mongo)?;
    if held.matched_count == 0 {
        return Err(StoreError::Fenced {
            user: user.to_owned(),
            epoch,
        });
    }
    Ok(WriteOutcome::Leased { epoch })
}
