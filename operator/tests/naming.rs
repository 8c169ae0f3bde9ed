//! The operator names topics exactly as the broker does.

#[test]
fn topic_names_match_the_broker() {
    let long = "x".repeat(65);
    let ids = [
        "analytics",
        "app-1_A",
        "a.b",
        "with/slash",
        "ünïcödé",
        "",
        "x",
        &long,
        &long[..64],
        "sp ace",
    ];
    for prefix in ["ferrymq", "prod.eu-1"] {
        for id in ids {
            assert_eq!(
                ferrymq_operator::naming::application_topic(prefix, id),
                ferrymq::storage::kafka::application_topic(prefix, id),
                "client id {id:?}"
            );
        }
        assert_eq!(
            ferrymq_operator::naming::publish_log_topic(prefix),
            ferrymq::storage::kafka::msg_all_topic(prefix)
        );
    }
}
