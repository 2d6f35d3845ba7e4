use super::thin_uuid_prefix;

#[test]
fn thin_uuids_name_the_pool_and_fit_a_dm_uuid() {
    assert_eq!(thin_uuid_prefix("tp"), "thinsnap-tp-snap-");
    // LVM's pool device keeps its thin devices' uuids when it gains the -tpool layer.
    assert_eq!(thin_uuid_prefix("vg-p-tpool"), thin_uuid_prefix("vg-p"));
    let long = "x".repeat(127);
    let p = thin_uuid_prefix(&long);
    assert!(p.len() + "16777215".len() < 128, "{p}");
    assert_ne!(p, thin_uuid_prefix(&format!("{}y", "x".repeat(126))));
}
