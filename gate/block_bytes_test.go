package gate

import (
	"testing"
	"time"

	"github.com/meterd/meterd/schemas"
)

// The prerendered bodies are byte for byte what gateways have always
// passed on: member order, no HTML escaping of & in a billing URL, no
// trailing newline. Rendering them through schemas' problem layer must not
// change a byte.
func TestBlockBodyBytes(t *testing.T) {
	for _, tc := range []struct {
		d    schemas.Decision
		want string
	}{
		{quota("acme", 42), `{"type":"https://meterd.dev/problems/quota-exceeded","title":"Payment Required","status":402,` +
			`"detail":"acme used 1004 of 1000 api_calls in the period ending 2026-12-01T00:00:00Z; upgrade the plan or wait for the next period.",` +
			`"reason":"quota_exceeded","tenant":"acme","meter":"api_calls","limit":1000,"used":1004,"period_end":"2026-12-01T00:00:00Z",` +
			`"billing_url":"https://billing.example.com/acme"}`},
		{unpaid("bravo", schemas.ReasonPaymentOverdue, "https://billing.example.com/bravo?invoice=in_1&pay=1", 7),
			`{"type":"https://meterd.dev/problems/payment-overdue","title":"Payment Required","status":402,` +
				`"detail":"bravo's payment is overdue; pay the open invoice at https://billing.example.com/bravo?invoice=in_1&pay=1 to restore access.",` +
				`"reason":"payment_overdue","tenant":"bravo","billing_url":"https://billing.example.com/bravo?invoice=in_1&pay=1"}`},
		{unpaid("delta", schemas.ReasonSuspended, "", 3),
			`{"type":"https://meterd.dev/problems/suspended","title":"Payment Required","status":402,` +
				`"detail":"delta's account is suspended; contact the provider to restore access.","reason":"suspended","tenant":"delta"}`},
	} {
		if got := string(mustBlock(t, tc.d).Problem); got != tc.want {
			t.Errorf("%s body\n got %s\nwant %s", tc.d.Reason, got, tc.want)
		}
	}
	const stale = `{"type":"https://meterd.dev/problems/blocklist-stale","title":"Service Unavailable","status":503,` +
		`"detail":"the blocklist has had no update from the enforcer for more than 15s; requests are denied until it is current again.","reason":"stale"}`
	if got := string(newStaleBlock(15 * time.Second).Problem); got != stale {
		t.Errorf("stale body\n got %s\nwant %s", got, stale)
	}
}
