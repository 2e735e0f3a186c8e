// Design notes
// - Where the progress board lists each session and batch this worker has
//   seen a reply for (its slot, learned from the reply's `board_slot`), and
//   the final answer Python gave for it, kept while its board row is
//   unchanged (a restart changes the row, and the answer is asked again).
// - A slot is checked on every read: the row must still carry the work's id
//   hash and kind, or the work was deleted (or the slot reused) and the
//   entry goes. Reads take no GIL and make no call.
using System.Collections.Concurrent;

namespace EmbeddedWorker
{
    internal sealed class BoardStatusCache
    {
        public const long SessionKind = 1, BatchKind = 2;

        struct Slot
        {
            public int Index;
            public long Hash;
            public long Kind;
        }

        struct FinalReading
        {
            public long Sequence;
            public StatusReading Reading;
        }

        readonly ProgressBoard board;
        readonly ConcurrentDictionary<string, Slot> slots = new ConcurrentDictionary<string, Slot>();
        readonly ConcurrentDictionary<string, FinalReading> finals = new ConcurrentDictionary<string, FinalReading>();

        public BoardStatusCache(ProgressBoard board)
        {
            this.board = board;
        }

        /// <summary>The board row of `id`, when the board lists it.</summary>
        public bool TryRead(string id, long kind, out BoardRow row)
        {
            Slot slot;
            row = default(BoardRow);
            if (id == null || !slots.TryGetValue(id, out slot) || slot.Kind != kind) return false;
            if (board.TryRead(slot.Index, out row) && row.IdHash == slot.Hash && row.Kind == kind) return true;
            slots.TryRemove(id, out slot);  // deleted, or the slot went to other work
            FinalReading gone;
            finals.TryRemove(id, out gone);
            return false;
        }

        /// <summary>The row of a session or a batch with this id.</summary>
        public bool TryRead(string id, out BoardRow row)
        {
            return TryRead(id, SessionKind, out row) || TryRead(id, BatchKind, out row);
        }

        /// <summary>Remember where the board lists the work a reply names.</summary>
        public void Learn(Reply reply)
        {
            var slot = reply["board_slot"];
            if (!(slot is long) || (long)slot < 0) return;
            var session = reply["session_id"] as string;
            var batch = reply["batch_id"] as string;
            var id = batch ?? session;
            if (id == null || slots.ContainsKey(id)) return;
            slots[id] = new Slot { Index = (int)(long)slot, Hash = ProgressBoard.IdHash(id),
                                   Kind = batch != null ? BatchKind : SessionKind };
        }

        /// <summary>A copy of the final answer kept for `id` while its row is `row`.</summary>
        public bool TryGetFinal<T>(string id, BoardRow row, out T reading) where T : StatusReading
        {
            FinalReading kept;
            reading = null;
            if (!finals.TryGetValue(id, out kept) || kept.Sequence != row.Sequence) return false;
            reading = (T)Clone(kept.Reading);
            reading.FromBoard = true;
            return true;
        }

        /// <summary>Keep Python's final answer for `id`, valid while its row stays `row`.</summary>
        public void KeepFinal(string id, BoardRow row, StatusReading reading)
        {
            finals[id] = new FinalReading { Sequence = row.Sequence, Reading = Clone(reading) };
        }

        public void Dispose()
        {
            board.Dispose();
        }

        static StatusReading Clone(StatusReading reading)
        {
            var session = reading as SessionStatus;
            return session != null ? (StatusReading)session.Copy() : ((BatchStatus)reading).Copy();
        }
    }
}
