package schemas

import (
	"fmt"
	"testing"
	"time"
)

func TestZZProbe(t *testing.T) {
	for _, doc := range []string{
		`{"id":"a","meter":"m","tenant":null}`,
		`{"id":"a","meter":"m","time":null}`,
		`{"id":"a","meter":"m","dimensions":null}`,
		`{"id":"a","meter":"m","dimensions":{"k":null}}`,
		`{"ID":"a","Meter":"m"}`,
		`{"id":"a","meter":"m","value":0e500}`,
		`{"id":"a","meter":"m","time":"2026-01-01t00:00:00z"}`,
		`{"id":"a","meter":"m","time":"2026-01-01T1:00:00Z"}`,
		`{"id":"a","meter":"m","time":"2026-01-01T01:00:00,5Z"}`,
		`{"id":"a","meter":"m","time":"2026-01-01T01:00:00"}`,
		`{"id":"a","meter":"m","time":"2026-01-01T01:00:00.1234567891234Z"}`,
		`{"id":"a","meter":"m","time":"2016-12-31T23:59:60Z"}`,
		`{"id":"a","meter":"m","time":"0000-01-01T00:00:00+01:00"}`,
		`{"id":"a","meter":"m","time":"2026-01-01T01:00:00+24:00"}`,
		`{"id":"a","meter":"m","time":"2026-01-01 01:00:00Z"}`,
		"\x00{}",
	} {
		d, err := DecodeEvents(MediaJSON, []byte(doc))
		var ve []FieldError
		if err == nil && len(d.Errors) == 0 {
			ve = d.Events[0].Validate(0, Window{}, nil)
		}
		fmt.Printf("%-75s err=%v ferrs=%v verrs=%v", doc, err, d.Errors, ve)
		if err == nil {
			fmt.Printf(" ev=%+v", d.Events[0])
			if _, err := EncodeBatch(&Batch{ID: "x", Events: d.Events}); err != nil {
				fmt.Printf(" ENCODE: %v", err)
			}
		}
		fmt.Println()
	}
	_ = time.Now
}
