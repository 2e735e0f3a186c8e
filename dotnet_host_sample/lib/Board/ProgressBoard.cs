// Design notes
// - The worker keeps every live session's and batch's progress in one numpy
//   int64 array (slots x fields). The host takes its buffer once and reads
//   rows through a pointer: no GIL, no call into Python, however busy the
//   device keeps the interpreter.
// - Rows are written under a sequence lock: `sequence` is odd while a write
//   is under way. A read copies the row between two reads of `sequence` and
//   retries when they differ or are odd, so a torn row is never returned.
// - The field order is checked once against the worker's board_layout, so a
//   read is fifteen loads at fixed offsets; `IdHash` lets a reader check that
//   a slot still belongs to the session it is polling.
// - The buffer is a BufferLease (the C API, its format checked as 8-byte
//   integers on both runtimes). Each read enters the lease, so a read racing
//   Dispose either finishes first or finds the board empty: never freed memory.
#pragma warning disable 612  // PyObject.Handle: read while the object is alive, to take its buffer
using System;
using System.Text;
using System.Threading;
using Python.Runtime;

namespace EmbeddedWorker
{
    public sealed unsafe class ProgressBoard : IDisposable
    {
        BufferLease buffer;
        byte* start;
        string[] statuses;
        long rowBytes;

        public int Slots { get; private set; }

        /// <summary>The field order this reader was written for; Open refuses a board laid out otherwise.</summary>
        static readonly string[] Names =
        {
            "sequence", "kind", "state", "progress_bp", "current_step", "total_steps", "denoise_step",
            "denoise_total", "items_done", "items_failed", "items_total", "eta_ms", "updated_unix_ms", "id_hash",
            "attempt",
        };

        /// <summary>Call with the GIL held; `board` stays the caller's.</summary>
        internal static ProgressBoard Open(PyObject board, Reply layout)
        {
            var fields = layout.List("fields");
            for (int i = 0; i < Names.Length; i++)
                if (i >= fields.Count || (string)fields[i] != Names[i])
                    throw new InvalidOperationException("the worker's board has field '" + (i < fields.Count ? fields[i] : null)
                                                        + "' where this host reads '" + Names[i] + "': versions differ");
            var buffer = BufferLease.Take(board.Handle, false, "ProgressBoard");
            var format = buffer.Format.TrimStart('<', '=', '@');
            if (buffer.ItemSize != 8 || (format != "q" && format != "l") || buffer.Shape.Length != 2
                || buffer.Shape[1] < Names.Length)
            {
                buffer.Release();
                throw new InvalidOperationException("the progress board is not a 2-D int64 array");
            }
            var result = new ProgressBoard { buffer = buffer };
            result.start = (byte*)buffer.Pointer;
            result.Slots = (int)buffer.Shape[0];
            result.rowBytes = buffer.Shape[1] * 8;
            var codes = (Reply)layout["state_codes"];
            result.statuses = new string[16];
            foreach (var name in codes.Names) result.statuses[codes.Number(name)] = name;
            return result;
        }

        /// <summary>A consistent copy of one slot; false if the slot is out of range or busy for too long.</summary>
        public bool TryRead(int slot, out BoardRow row)
        {
            row = default(BoardRow);
            if (slot < 0 || slot >= Slots) return false;
            if (!buffer.TryEnter()) return false;  // disposed: an empty board
            try { return Read(slot, ref row); }
            finally { buffer.Leave(); }
        }

        bool Read(int slot, ref BoardRow row)
        {
            long* f = (long*)(start + slot * rowBytes);
            for (int attempt = 0; attempt < 1000; attempt++)
            {
                long before = Volatile.Read(ref f[0]);
                if ((before & 1) != 0) { Thread.SpinWait(8); continue; }
                row.Kind = f[1];
                row.State = f[2];
                row.ProgressBp = f[3];
                row.CurrentStep = f[4];
                row.TotalSteps = f[5];
                row.DenoiseStep = f[6];
                row.DenoiseTotal = f[7];
                row.ItemsDone = f[8];
                row.ItemsFailed = f[9];
                row.ItemsTotal = f[10];
                row.EtaMs = f[11];
                row.UpdatedUnixMs = f[12];
                row.IdHash = f[13];
                row.Attempt = f[14];
                Thread.MemoryBarrier();  // every field read before the sequence is read again
                if (Volatile.Read(ref f[0]) != before) continue;
                row.Sequence = before;
                row.Status = row.State >= 0 && row.State < statuses.Length ? statuses[row.State] : null;
                return true;
            }
            return false;
        }

        /// <summary>FNV-1a 64 of the id's UTF-8 bytes, as the worker stores it in `id_hash`.</summary>
        public static long IdHash(string id)
        {
            ulong hash = 0xCBF29CE484222325;
            foreach (var b in Encoding.UTF8.GetBytes(id))
            {
                hash ^= b;
                hash *= 0x100000001B3;
            }
            return unchecked((long)hash);
        }

        /// <summary>Release the board; any thread, any number of times (PythonRuntime does it at shutdown).</summary>
        public void Dispose()
        {
            buffer.Release();  // readers see an empty board from here on
        }
    }
}
