// Design notes
// - PyGILState_Ensure on a thread Python has no state for makes one (a
//   PyThreadState, allocated and linked into the interpreter), and the
//   matching PyGILState_Release clears and deletes it again. A .NET request
//   thread has none, so every call paid for a thread state's birth and death:
//   0.4 us for the GIL's take and give-back here, against 0.1 us with a kept
//   state (the interpreter's first thread always had one).
// - So a thread that calls through the C API keeps its state: its first
//   Ensure is never released (the state's count stays at one), and the
//   thread gives the GIL back with PyEval_SaveThread. Its later Ensure and
//   Release only take and give back the GIL. Pythonnet's Py.GIL() on the same
//   thread finds the same state.
// - A thread that already holds the GIL (a call nested in `using (Py.GIL())`)
//   is not pinned then: giving the GIL back would pull it from under the
//   outer block. It pins on a later, outermost call.
// - States of threads that ended are cleared and deleted, under the GIL, the
//   next time a thread pins one, so there are never more than live threads
//   that called plus those that ended since. Only states made here are: the
//   interpreter's first thread keeps its own. PythonEngine.Shutdown deletes
//   the rest (Py_Finalize clears every thread state of the interpreter).
// - A new interpreter (a runtime started again after a shutdown) starts a new
//   generation: the states of the old one are gone, so every thread pins again.
using System;
using System.Collections.Generic;
using System.Threading;

namespace EmbeddedWorker
{
    internal static class ThreadStates
    {
        [ThreadStatic] static int pinnedGeneration;
        static int generation;
        static readonly List<KeyValuePair<Thread, IntPtr>> made = new List<KeyValuePair<Thread, IntPtr>>();  // guarded by itself and the GIL

        /// <summary>A new interpreter: every thread pins its state afresh. With the GIL held.</summary>
        public static void NewInterpreter()
        {
            lock (made) made.Clear();
            Interlocked.Increment(ref generation);
        }

        /// <summary>PyGILState_Ensure, on a thread whose state outlives the call. Pair with PythonApi.GilRelease.</summary>
        public static int Ensure()
        {
            if (pinnedGeneration != Volatile.Read(ref generation) && PythonApi.GilCheck() == 0) Pin();
            return PythonApi.GilEnsure();
        }

        static void Pin()
        {
            bool ours = PythonApi.GetThisThreadState() == IntPtr.Zero;
            PythonApi.GilEnsure();  // never released: the count it leaves keeps the state alive
            lock (made)
            {
                for (int i = made.Count - 1; i >= 0; i--)
                {
                    if (made[i].Key.IsAlive) continue;
                    PythonApi.ThreadStateClear(made[i].Value);
                    PythonApi.ThreadStateDelete(made[i].Value);
                    made.RemoveAt(i);
                }
                if (ours) made.Add(new KeyValuePair<Thread, IntPtr>(Thread.CurrentThread, PythonApi.GetThisThreadState()));
            }
            pinnedGeneration = Volatile.Read(ref generation);
            PythonApi.SaveThread();
        }
    }
}
