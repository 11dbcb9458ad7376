package schemas

import (
	"fmt"
	"hash/fnv"
	"strings"
	"testing"
)

func TestPartition(t *testing.T) {
	tenants := []string{"", "a", "acme", "ACME", "foobar", "globex-corp", "tenant.with.dots", "t_1", "é", strings.Repeat("z", 128)}
	for _, p := range []int{1, 16, 7} {
		for _, tenant := range tenants {
			h := fnv.New32a()
			h.Write([]byte(tenant))
			want := int(h.Sum32() % uint32(p))
			if got := Partition(tenant, p); got != want {
				t.Errorf("Partition(%q, %d) = %d, want %d", tenant, p, got, want)
			}
		}
	}
	// Published FNV-1a 32 vectors: "" = 0x811c9dc5, "a" = 0xe40c292c,
	// "foobar" = 0xbf9cf968; other languages must get the same partitions.
	for _, tc := range []struct {
		tenant string
		p      int
		want   int
	}{
		{"", 16, 0x811c9dc5 % 16}, {"a", 16, 0xe40c292c % 16}, {"foobar", 16, 0xbf9cf968 % 16},
		{"", 7, 0x811c9dc5 % 7}, {"a", 7, 0xe40c292c % 7}, {"foobar", 7, 0xbf9cf968 % 7},
		{"foobar", 16, 8}, {"foobar", 7, 0}, {"a", 7, 5}, {"", 7, 2},
		{"foobar", 1, 0}, {"foobar", 0, 0}, {"foobar", -3, 0},
	} {
		if got := Partition(tc.tenant, tc.p); got != tc.want {
			t.Errorf("Partition(%q, %d) = %d, want %d", tc.tenant, tc.p, got, tc.want)
		}
	}
}

func TestPartitionDistribution(t *testing.T) {
	const tenants, partitions = 10000, 16
	var counts [partitions]int
	for i := range tenants {
		counts[Partition(fmt.Sprintf("tenant-%05d", i), partitions)]++
	}
	for p, n := range counts {
		if n < tenants*4/100 || n > tenants*8/100 {
			t.Errorf("partition %d holds %d of %d tenants, want 4%%..8%%: %v", p, n, tenants, counts)
		}
	}
}

func TestSubjects(t *testing.T) {
	for _, tc := range []struct{ got, want string }{
		{UsageSubject(0), "meterd.usage.0"},
		{UsageSubject(15), "meterd.usage.15"},
		{CommittedSubject(7), "meterd.committed.7"},
		{NotifySubject("acme"), "meterd.notify.acme"},
		{UsageSubject(Partition("acme", DefaultPartitions)), fmt.Sprintf("meterd.usage.%d", Partition("acme", 16))},
	} {
		if tc.got != tc.want {
			t.Errorf("got %q, want %q", tc.got, tc.want)
		}
	}
	if !strings.HasPrefix(UsageSubject(3), strings.TrimSuffix(UsageSubjects, ">")) ||
		!strings.HasPrefix(DLQSubjectPrefix+"x", strings.TrimSuffix(DLQSubjects, ">")) {
		t.Error("subjects fall outside their stream's filter")
	}
}
