//! The two admin requests rdkafka 0.38 does not wrap, through librdkafka's C API:
//!
//! * **IncrementalAlterConfigs** (KIP-339). rdkafka only wraps the legacy `AlterConfigs`, which
//!   replaces a topic's whole dynamic configuration (a key left out is reset), is deprecated in
//!   Kafka, and is not implemented by every Kafka-protocol server (some have only the
//!   incremental request). Setting and deleting single keys is what a drift revert needs.
//! * **DescribeTopics** (KIP-966 era admin call): the topic id, which metadata in rdkafka does
//!   not expose. A topic id that changes means the topic was deleted and created again.
//!
//! Each call owns a private result queue, so it does not interfere with rdkafka's own admin
//! polling thread, and runs on the blocking pool: `rd_kafka_queue_poll` blocks until the
//! result arrives or the timeout passes. Every native object is released by a guard, also on an
//! early return.

use std::ffi::{CStr, CString};
use std::os::raw::c_char;
use std::ptr;
use std::time::Duration;

use rdkafka::admin::AdminClient;
use rdkafka::bindings as rd;
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

/// What went wrong in a native admin call: the librdkafka error code and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeError {
    pub code: RDKafkaErrorCode,
    pub message: String,
}

impl NativeError {
    fn new(code: rd::rd_kafka_resp_err_t, message: String) -> NativeError {
        NativeError {
            code: code.into(),
            message,
        }
    }

    fn local(message: impl Into<String>) -> NativeError {
        NativeError {
            code: RDKafkaErrorCode::InvalidArgument,
            message: message.into(),
        }
    }
}

/// One change of a topic configuration key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigOp {
    Set(String, String),
    /// Back to the cluster's default.
    Delete(String),
}

/// What DescribeTopics says about one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    /// Kafka's topic id in its usual base64 form; `None` when the server reports none.
    pub topic_id: Option<String>,
    pub partitions: i32,
    /// Replicas of partition 0.
    pub replication_factor: i32,
}

/// # Safety
/// `p` is null or a NUL-terminated string that lives as long as the call.
unsafe fn text(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

fn cstring(s: &str) -> Result<CString, NativeError> {
    CString::new(s).map_err(|_| NativeError::local(format!("`{s}` contains a NUL byte")))
}

/// Frees a librdkafka object when dropped.
struct Guard<T> {
    ptr: *mut T,
    free: unsafe extern "C" fn(*mut T),
}

impl<T> Drop for Guard<T> {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: `ptr` came from the matching constructor and is freed exactly once.
            unsafe { (self.free)(self.ptr) }
        }
    }
}

/// A raw pointer that may cross to the blocking pool: librdkafka handles are thread-safe, and
/// the `AdminClient` the pointer belongs to outlives the call (the caller awaits it).
struct SendPtr(*mut rd::rd_kafka_t);
// SAFETY: see above; rd_kafka_t is documented as thread-safe.
unsafe impl Send for SendPtr {}

fn timeout_ms(timeout: Duration) -> i32 {
    i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX)
}

/// Runs `request` (which enqueues one admin call on the given queue) and waits for its result
/// event; `read` turns the event into the answer.
fn call<R>(
    rk: SendPtr,
    op: rd::rd_kafka_admin_op_t,
    timeout: Duration,
    request: impl FnOnce(
        *mut rd::rd_kafka_t,
        *const rd::rd_kafka_AdminOptions_t,
        *mut rd::rd_kafka_queue_t,
    ),
    read: impl FnOnce(*mut rd::rd_kafka_event_t) -> Result<R, NativeError>,
) -> Result<R, NativeError> {
    let rk = rk.0;
    // SAFETY: `rk` is a live client handle (see SendPtr); every object created here is freed by
    // its guard, the event after `read` has copied what it needs out of it.
    unsafe {
        let queue = Guard {
            ptr: rd::rd_kafka_queue_new(rk),
            free: rd::rd_kafka_queue_destroy,
        };
        let options = Guard {
            ptr: rd::rd_kafka_AdminOptions_new(rk, op),
            free: rd::rd_kafka_AdminOptions_destroy,
        };
        if queue.ptr.is_null() || options.ptr.is_null() {
            return Err(NativeError::local(
                "librdkafka could not allocate an admin request",
            ));
        }
        let mut errstr = [0 as c_char; 512];
        let err = rd::rd_kafka_AdminOptions_set_request_timeout(
            options.ptr,
            timeout_ms(timeout),
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(NativeError::new(err, text(errstr.as_ptr())));
        }
        request(rk, options.ptr, queue.ptr);
        // The request timeout bounds the call; the margin covers librdkafka's own scheduling.
        let event = Guard {
            ptr: rd::rd_kafka_queue_poll(queue.ptr, timeout_ms(timeout + Duration::from_secs(2))),
            free: rd::rd_kafka_event_destroy,
        };
        if event.ptr.is_null() {
            return Err(NativeError {
                code: RDKafkaErrorCode::OperationTimedOut,
                message: format!("no answer within {timeout:?}"),
            });
        }
        let err = rd::rd_kafka_event_error(event.ptr);
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(NativeError::new(
                err,
                text(rd::rd_kafka_event_error_string(event.ptr)),
            ));
        }
        read(event.ptr)
    }
}

/// Applies `ops` to the configuration of `topic` in one IncrementalAlterConfigs request.
pub async fn incremental_alter_topic_config(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    ops: &[ConfigOp],
    timeout: Duration,
) -> Result<(), NativeError> {
    let name = cstring(topic)?;
    let mut entries = Vec::with_capacity(ops.len());
    for op in ops {
        entries.push(match op {
            ConfigOp::Set(k, v) => (
                cstring(k)?,
                Some(cstring(v)?),
                rd::rd_kafka_AlterConfigOpType_t::RD_KAFKA_ALTER_CONFIG_OP_TYPE_SET,
            ),
            ConfigOp::Delete(k) => (
                cstring(k)?,
                None,
                rd::rd_kafka_AlterConfigOpType_t::RD_KAFKA_ALTER_CONFIG_OP_TYPE_DELETE,
            ),
        });
    }
    let rk = SendPtr(admin.inner().native_ptr());
    tokio::task::spawn_blocking(move || {
        // SAFETY: the resource is created, filled and freed here; librdkafka copies it when the
        // request is enqueued.
        let resource = Guard {
            ptr: unsafe {
                rd::rd_kafka_ConfigResource_new(
                    rd::rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_TOPIC,
                    name.as_ptr(),
                )
            },
            free: rd::rd_kafka_ConfigResource_destroy,
        };
        if resource.ptr.is_null() {
            return Err(NativeError::local(
                "librdkafka could not allocate a config resource",
            ));
        }
        for (key, value, op) in &entries {
            // SAFETY: the strings outlive the call; a returned error object is owned by us.
            let error = Guard {
                ptr: unsafe {
                    rd::rd_kafka_ConfigResource_add_incremental_config(
                        resource.ptr,
                        key.as_ptr(),
                        *op,
                        value.as_ref().map_or(ptr::null(), |v| v.as_ptr()),
                    )
                },
                free: rd::rd_kafka_error_destroy,
            };
            if !error.ptr.is_null() {
                // SAFETY: a live error object.
                let (code, message) = unsafe {
                    (
                        rd::rd_kafka_error_code(error.ptr),
                        text(rd::rd_kafka_error_string(error.ptr)),
                    )
                };
                return Err(NativeError::new(code, message));
            }
        }
        let mut resources = [resource.ptr];
        call(
            rk,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_INCREMENTALALTERCONFIGS,
            timeout,
            |rk, options, queue| unsafe {
                rd::rd_kafka_IncrementalAlterConfigs(
                    rk,
                    resources.as_mut_ptr(),
                    resources.len(),
                    options,
                    queue,
                )
            },
            |event| unsafe {
                let result = rd::rd_kafka_event_IncrementalAlterConfigs_result(event);
                if result.is_null() {
                    return Err(NativeError::local(
                        "unexpected event type for IncrementalAlterConfigs",
                    ));
                }
                let mut count = 0usize;
                let list =
                    rd::rd_kafka_IncrementalAlterConfigs_result_resources(result, &mut count);
                for i in 0..count {
                    let r = *list.add(i);
                    let err = rd::rd_kafka_ConfigResource_error(r);
                    if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                        return Err(NativeError::new(
                            err,
                            text(rd::rd_kafka_ConfigResource_error_string(r)),
                        ));
                    }
                }
                Ok(())
            },
        )
    })
    .await
    .map_err(|e| NativeError::local(format!("admin task failed: {e}")))?
}

/// DescribeTopics for one topic: `Ok(None)` when it does not exist.
pub async fn describe_topic(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    timeout: Duration,
) -> Result<Option<TopicInfo>, NativeError> {
    let name = cstring(topic)?;
    let rk = SendPtr(admin.inner().native_ptr());
    tokio::task::spawn_blocking(move || {
        let mut names = [name.as_ptr()];
        // SAFETY: the collection copies the names; freed by its guard.
        let collection = Guard {
            ptr: unsafe { rd::rd_kafka_TopicCollection_of_topic_names(names.as_mut_ptr(), 1) },
            free: rd::rd_kafka_TopicCollection_destroy,
        };
        if collection.ptr.is_null() {
            return Err(NativeError::local(
                "librdkafka could not allocate a topic collection",
            ));
        }
        call(
            rk,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS,
            timeout,
            |rk, options, queue| unsafe {
                rd::rd_kafka_DescribeTopics(rk, collection.ptr, options, queue)
            },
            |event| unsafe {
                let result = rd::rd_kafka_event_DescribeTopics_result(event);
                if result.is_null() {
                    return Err(NativeError::local(
                        "unexpected event type for DescribeTopics",
                    ));
                }
                let mut count = 0usize;
                let topics = rd::rd_kafka_DescribeTopics_result_topics(result, &mut count);
                for i in 0..count {
                    let t = *topics.add(i);
                    if text(rd::rd_kafka_TopicDescription_name(t)) != name.to_string_lossy() {
                        continue;
                    }
                    let error = rd::rd_kafka_TopicDescription_error(t);
                    if !error.is_null() {
                        let code: RDKafkaErrorCode = rd::rd_kafka_error_code(error).into();
                        if code == RDKafkaErrorCode::UnknownTopicOrPartition {
                            return Ok(None);
                        }
                        return Err(NativeError {
                            code,
                            message: text(rd::rd_kafka_error_string(error)),
                        });
                    }
                    let mut parts = 0usize;
                    let partitions = rd::rd_kafka_TopicDescription_partitions(t, &mut parts);
                    let mut replicas = 0usize;
                    if parts > 0 {
                        let _ =
                            rd::rd_kafka_TopicPartitionInfo_replicas(*partitions, &mut replicas);
                    }
                    let id = rd::rd_kafka_TopicDescription_topic_id(t);
                    let topic_id = if id.is_null() {
                        None
                    } else {
                        let zero = rd::rd_kafka_Uuid_most_significant_bits(id) == 0
                            && rd::rd_kafka_Uuid_least_significant_bits(id) == 0;
                        (!zero).then(|| text(rd::rd_kafka_Uuid_base64str(id)))
                    };
                    return Ok(Some(TopicInfo {
                        topic_id,
                        partitions: i32::try_from(parts).unwrap_or(i32::MAX),
                        replication_factor: i32::try_from(replicas).unwrap_or(i32::MAX),
                    }));
                }
                Ok(None)
            },
        )
    })
    .await
    .map_err(|e| NativeError::local(format!("admin task failed: {e}")))?
}
